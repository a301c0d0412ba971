//! Where a save may write, decided before any work: the output and its data file are free (or
//! `--force` was given and they are regular files), the folder exists and is writable, and
//! neither file is the input model or one of its external-data files. Also the temporary folders a
//! save writes into: registered while they live, so a signal handler can remove them, and
//! left-overs of a killed run cleaned on the next save.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{anyhow, bail, Context, Result};

use super::tensor::{external_ref, file_kind, is_external, resolve_location};

/// The paths one save writes.
#[derive(Debug, Clone)]
pub struct OutputPaths {
    /// The folder of the output (".`" for a bare file name).
    pub dir: PathBuf,
    /// The output's file name.
    pub name: String,
    /// `<name>.data`, the external data file beside it.
    pub data_name: String,
}

impl OutputPaths {
    pub fn of(out: &Path) -> Result<Self> {
        let name = match out.file_name() {
            Some(n) if !out.as_os_str().to_string_lossy().ends_with('/') => n.to_string_lossy().to_string(),
            _ => bail!("{} names no file (it is a directory path)", out.display()),
        };
        let dir = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let data_name = format!("{name}.data");
        Ok(OutputPaths { dir, name, data_name })
    }

    pub fn out(&self) -> PathBuf {
        self.dir.join(&self.name)
    }

    pub fn data(&self) -> PathBuf {
        self.dir.join(&self.data_name)
    }

    /// `.<name>.tmp<pid>`: this process's temporary folder for the save.
    pub fn temp_dir(&self) -> PathBuf {
        self.dir.join(format!("{}{}", self.temp_prefix(), std::process::id()))
    }

    fn temp_prefix(&self) -> String {
        format!(".{}.tmp", self.name)
    }
}

/// (device, inode) of an existing file: the identity of a file whatever path (or hard link) names it.
fn identity(p: &Path) -> Option<(u64, u64)> {
    fs::metadata(p).ok().map(|m| (m.dev(), m.ino()))
}

/// The files a loaded model reads: the model and every external-data file it names.
pub fn input_files(model_path: &Path, proto: &onnx_protobuf::ModelProto, base: &Path) -> Vec<PathBuf> {
    let mut files = vec![model_path.to_path_buf()];
    for t in proto.graph.initializer.iter().filter(|t| is_external(t)) {
        if let Ok(r) = external_ref(t) {
            if let Ok(p) = resolve_location(base, &r.location) {
                if !files.contains(&p) {
                    files.push(p);
                }
            }
        }
    }
    files
}

/// Checks one destination file: free, or (with `force`) a regular file that is none of `inputs`.
fn check_target(path: &Path, what: &str, force: bool, inputs: &[PathBuf]) -> Result<()> {
    let id = identity(path);
    if let Some(id) = id {
        if let Some(i) = inputs.iter().find(|i| identity(i) == Some(id)) {
            bail!(
                "{} ({what}) is the input's file {}: writing it would destroy the input; choose another output name",
                path.display(),
                i.display()
            );
        }
    }
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(anyhow!(e).context(format!("cannot inspect {}", path.display()))),
    };
    let ft = meta.file_type();
    // A symlink is replaced itself (rename does not follow it); what it points at decides whether
    // that is allowed, so a link to a device is refused like the device.
    let target_ft = if ft.is_symlink() { fs::metadata(path).map(|m| m.file_type()).ok() } else { Some(ft) };
    if let Some(tft) = target_ft {
        if tft.is_dir() {
            bail!("{} ({what}) is a directory; give a file name", path.display());
        }
        if !tft.is_file() {
            bail!("{} ({what}) exists and is {}: it is never replaced, even with --force", path.display(), file_kind(tft));
        }
    }
    if !force {
        bail!("{} exists ({what}); pass --force to overwrite it", path.display());
    }
    Ok(())
}

/// The checks of [`check_output`] on the two destination files alone (run again at commit).
pub fn check_targets(out: &Path, force: bool, inputs: &[PathBuf]) -> Result<()> {
    let paths = OutputPaths::of(out)?;
    check_target(out, "the output", force, inputs)?;
    check_target(&paths.data(), "the output's external data file", force, inputs)
}

/// Every check of a save's destination, run before any work: `out` and `out.data` free or
/// `force` (regular files only), the folder exists and is writable, and neither is one of
/// `inputs` (the input model and its external-data files). Left-over temporary folders of a
/// killed save to the same output are removed (and named on stderr).
pub fn check_output(out: &Path, force: bool, inputs: &[PathBuf]) -> Result<OutputPaths> {
    let paths = OutputPaths::of(out)?;
    match fs::metadata(&paths.dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => bail!("output directory {} is not a directory", paths.dir.display()),
        Err(_) => bail!("output directory {} does not exist", paths.dir.display()),
    }
    check_targets(out, force, inputs)?;
    clean_leftovers(&paths);
    // Writable: the save's own temporary folder is created (and removed) as the probe.
    let probe = paths.temp_dir();
    fs::create_dir(&probe).with_context(|| format!("output directory {} is not writable", paths.dir.display()))?;
    let _ = fs::remove_dir(&probe);
    Ok(paths)
}

/// Removes `.<name>.tmp<pid>` folders whose process is gone (a save killed by SIGKILL or a power
/// loss) when they hold nothing but a save's own files; reports those it leaves.
fn clean_leftovers(paths: &OutputPaths) {
    let prefix = paths.temp_prefix();
    let Ok(entries) = fs::read_dir(&paths.dir) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(pid) = name.strip_prefix(&prefix).and_then(|p| p.parse::<u32>().ok()) else { continue };
        let path = e.path();
        if !fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) {
            continue;
        }
        if pid == std::process::id() {
            continue;
        }
        if Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("note: {} belongs to a running process ({pid}); left as is", path.display());
            continue;
        }
        let ours = fs::read_dir(&path).map(|d| {
            d.flatten().all(|f| {
                let n = f.file_name();
                (n == paths.name.as_str() || n == paths.data_name.as_str()) && f.file_type().is_ok_and(|t| t.is_file())
            })
        });
        if ours.unwrap_or(false) && fs::remove_dir_all(&path).is_ok() {
            eprintln!("note: removed {}, left over by an interrupted save", path.display());
        } else {
            eprintln!("note: {} looks left over by an interrupted save but holds other files; remove it by hand", path.display());
        }
    }
}

/// Temporary folders of saves in progress, for [`remove_temp_dirs`].
static LIVE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// A save's temporary folder: registered while it lives, removed (with what is in it) when dropped,
/// so temp files never outlive a failed save.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn create(path: PathBuf) -> Result<Self> {
        let mut live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
        let _ = fs::remove_dir_all(&path);
        fs::create_dir(&path).with_context(|| format!("cannot create the temporary directory {}", path.display()))?;
        live.push(path.clone());
        Ok(TempDir(path))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let mut live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
        let _ = fs::remove_dir_all(&self.0);
        live.retain(|p| p != &self.0);
    }
}

/// Removes every live temporary folder. For a signal handler (on its own thread, as the `ctrlc`
/// crate runs it) before the process exits: the lock is held to the end, so no new folder
/// appears, and removal is retried while the saving thread may still be adding a file.
pub fn remove_temp_dirs() {
    let live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
    for p in live.iter() {
        for _ in 0..20 {
            if fs::remove_dir_all(p).is_ok() || !p.exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
    // Keep the lock: the process exits next, and no save may start a new folder meanwhile.
    std::mem::forget(live);
}
