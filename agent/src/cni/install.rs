//! `netsieve cni install | uninstall`: puts the `netsieve-cni` binary into the node's CNI
//! binary directory and appends the plugin to the node's network configuration list, or takes
//! both away. Used by the DaemonSet's init container and by `netsieve cleanup`.
//!
//! Idempotent: installing twice leaves the same files (the binary is rewritten only when its
//! content differs; the plugin entry is appended only when missing and otherwise updated in
//! place). Files are replaced by rename, so a runtime reading them concurrently sees the old or
//! the new version, never a partial one. The configuration the runtime uses is the first
//! `.conflist`, `.conf` or `.json` file of the directory in lexical order (what containerd and
//! CRI-O pick); it must be a configuration list (`plugins`), since a chained plugin needs one.
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The plugin's `type` in a conflist: the name of its executable.
pub const PLUGIN_TYPE: &str = "netsieve-cni";

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("no CNI network configuration in {dir} (waited {waited:?})")]
    NoConfig { dir: PathBuf, waited: Duration },
    #[error("{path}: not a CNI configuration list: {reason}")]
    NotAList { path: PathBuf, reason: String },
    #[error("{path}: {source}")]
    Json { path: PathBuf, source: serde_json::Error },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> InstallError + '_ {
    move |source| InstallError::Io { path: path.to_path_buf(), source }
}

/// What `install` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    pub binary: PathBuf,
    pub binary_written: bool,
    pub conflist: PathBuf,
    pub conflist_written: bool,
}

/// What `uninstall` did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Uninstalled {
    pub conflists_changed: Vec<PathBuf>,
    pub binary_removed: bool,
}

/// The network configuration the runtime uses: the first `.conflist`/`.conf`/`.json` by name.
pub fn active_config(conf_dir: &Path) -> Result<Option<PathBuf>, InstallError> {
    let entries = match std::fs::read_dir(conf_dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(io(conf_dir)(error)),
    };
    let mut configs: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file() && matches!(p.extension().and_then(|e| e.to_str()), Some("conflist" | "conf" | "json")))
        .collect();
    configs.sort();
    Ok(configs.into_iter().next())
}

/// Writes `bytes` to `path` through a hidden temporary file in the same directory and a
/// rename, with `mode`.
fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> Result<(), InstallError> {
    use std::os::unix::fs::PermissionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    // Hidden and without a configuration extension: a runtime never picks it up.
    let tmp = dir.join(format!(".{name}.netsieve-tmp"));
    std::fs::write(&tmp, bytes).map_err(io(&tmp))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// Adds or updates the netsieve plugin in a configuration list; returns the new text when it
/// changed.
pub fn with_plugin(conflist: &Value, socket: &Path, path: &Path) -> Result<Option<Value>, InstallError> {
    let not_a_list = |reason: &str| InstallError::NotAList { path: path.to_path_buf(), reason: reason.to_string() };
    let mut updated = conflist.clone();
    let plugins = updated
        .get_mut("plugins")
        .ok_or_else(|| not_a_list("no `plugins` (a single-plugin .conf cannot chain; convert it to a .conflist)"))?
        .as_array_mut()
        .ok_or_else(|| not_a_list("`plugins` is not a list"))?;
    if plugins.is_empty() {
        return Err(not_a_list("`plugins` is empty: there is no main plugin to chain after"));
    }
    let entry = json!({ "type": PLUGIN_TYPE, "socket": socket.display().to_string() });
    let ours: Vec<usize> =
        plugins.iter().enumerate().filter(|(_, p)| p.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)).map(|(i, _)| i).collect();
    match ours.as_slice() {
        [] => plugins.push(entry),
        [index] => plugins[*index] = entry,
        // Duplicates (hand edits): keep one, last, so it runs after every other plugin.
        _ => {
            plugins.retain(|p| p.get("type").and_then(Value::as_str) != Some(PLUGIN_TYPE));
            plugins.push(entry);
        }
    }
    Ok((updated != *conflist).then_some(updated))
}

/// Removes the netsieve plugin from a configuration list; returns the new text when it changed.
pub fn without_plugin(conflist: &Value) -> Option<Value> {
    let mut updated = conflist.clone();
    let plugins = updated.get_mut("plugins")?.as_array_mut()?;
    let before = plugins.len();
    plugins.retain(|p| p.get("type").and_then(Value::as_str) != Some(PLUGIN_TYPE));
    (plugins.len() != before).then_some(updated)
}

fn read_json(path: &Path) -> Result<Value, InstallError> {
    let text = std::fs::read(path).map_err(io(path))?;
    serde_json::from_slice(&text).map_err(|source| InstallError::Json { path: path.to_path_buf(), source })
}

fn to_text(value: &Value, path: &Path) -> Result<Vec<u8>, InstallError> {
    let mut text = serde_json::to_vec_pretty(value).map_err(|source| InstallError::Json { path: path.to_path_buf(), source })?;
    text.push(b'\n');
    Ok(text)
}

/// Copies `binary` into `bin_dir` (as `netsieve-cni`) and chains the plugin into the active
/// configuration list of `conf_dir`, waiting up to `wait` for the main plugin's configuration
/// to appear (the main CNI's own DaemonSet may start at the same time).
pub fn install(binary: &Path, bin_dir: &Path, conf_dir: &Path, socket: &Path, wait: Duration) -> Result<Installed, InstallError> {
    let target = bin_dir.join(PLUGIN_TYPE);
    let content = std::fs::read(binary).map_err(io(binary))?;
    let binary_written = std::fs::read(&target).ok().as_deref() != Some(content.as_slice());
    if binary_written {
        std::fs::create_dir_all(bin_dir).map_err(io(bin_dir))?;
        write_atomically(&target, &content, 0o755)?;
    }
    // The binary first: the runtime must find it as soon as the configuration names it.
    let started = Instant::now();
    let conflist = loop {
        if let Some(path) = active_config(conf_dir)? {
            break path;
        }
        if started.elapsed() >= wait {
            return Err(InstallError::NoConfig { dir: conf_dir.to_path_buf(), waited: started.elapsed() });
        }
        std::thread::sleep(Duration::from_millis(500).min(wait));
    };
    let current = read_json(&conflist)?;
    let conflist_written = match with_plugin(&current, socket, &conflist)? {
        Some(updated) => {
            write_atomically(&conflist, &to_text(&updated, &conflist)?, 0o644)?;
            true
        }
        None => false,
    };
    Ok(Installed { binary: target, binary_written, conflist, conflist_written })
}

/// Removes the plugin from every configuration list of `conf_dir`, then (unless
/// `keep_binary`) the binary from `bin_dir`. Missing directories and files are not errors.
pub fn uninstall(bin_dir: &Path, conf_dir: &Path, keep_binary: bool) -> Result<Uninstalled, InstallError> {
    let mut done = Uninstalled::default();
    if let Ok(entries) = std::fs::read_dir(conf_dir) {
        let mut paths: Vec<PathBuf> = entries.filter_map(Result::ok).map(|e| e.path()).collect();
        paths.sort();
        for path in paths {
            if !path.is_file() || !matches!(path.extension().and_then(|e| e.to_str()), Some("conflist" | "conf" | "json")) {
                continue;
            }
            // Files we cannot parse are not ours to touch.
            let Ok(current) = read_json(&path) else { continue };
            if let Some(updated) = without_plugin(&current) {
                write_atomically(&path, &to_text(&updated, &path)?, 0o644)?;
                done.conflists_changed.push(path);
            }
        }
    }
    if !keep_binary {
        let target = bin_dir.join(PLUGIN_TYPE);
        match std::fs::remove_file(&target) {
            Ok(()) => done.binary_removed = true,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(io(&target)(error)),
        }
    }
    Ok(done)
}
