//! Label selectors.
//!
//! Matching uses kube's own `Selector` (converted from the `LabelSelector`). Validation is added
//! here because kube's conversion accepts selectors the API server rejects and that would
//! change meaning if accepted: `In`/`NotIn` with an empty `values` list (kube turns it into a
//! selector that matches nothing / everything) and `Exists`/`DoesNotExist` with values.
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::core::{Selector, SelectorExt};
use serde::{Serialize, Serializer};
use std::collections::BTreeMap;

/// A validated label selector.
#[derive(Clone, Debug)]
pub struct LabelMatcher {
    selector: Selector,
    /// The selector as written, for display and JSON output.
    source: LabelSelector,
}

// Equality is on meaning (the converted selector), not on how the YAML spelled it.
impl PartialEq for LabelMatcher {
    fn eq(&self, other: &Self) -> bool {
        self.selector == other.selector
    }
}
impl Eq for LabelMatcher {}

impl Serialize for LabelMatcher {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.source.serialize(serializer)
    }
}

impl LabelMatcher {
    /// The empty selector `{}`, which selects everything.
    pub fn everything() -> LabelMatcher {
        LabelMatcher { selector: Selector::default(), source: LabelSelector::default() }
    }

    /// Validates and converts a selector; the error says what is wrong with which expression.
    pub fn compile(source: &LabelSelector) -> Result<LabelMatcher, String> {
        for (index, expr) in source.match_expressions.iter().flatten().enumerate() {
            let values = expr.values.as_deref().unwrap_or_default();
            match expr.operator.as_str() {
                "In" | "NotIn" if values.is_empty() => {
                    return Err(format!(
                        "matchExpressions[{index}]: operator {} on key {:?} needs at least one value",
                        expr.operator, expr.key
                    ));
                }
                "Exists" | "DoesNotExist" if !values.is_empty() => {
                    return Err(format!(
                        "matchExpressions[{index}]: operator {} on key {:?} takes no values",
                        expr.operator, expr.key
                    ));
                }
                "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
                other => {
                    return Err(format!(
                        "matchExpressions[{index}]: unknown operator {other:?} (In, NotIn, Exists, DoesNotExist)"
                    ));
                }
            }
        }
        let selector = Selector::try_from(source.clone()).map_err(|e| format!("invalid selector: {}", e.0))?;
        Ok(LabelMatcher { selector, source: source.clone() })
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.selector.matches(labels)
    }

    pub fn selects_all(&self) -> bool {
        self.selector.selects_all()
    }
}
