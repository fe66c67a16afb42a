//! Finding and loading the ONNX Runtime library.
//!
//! Invariants enforced here:
//! - The library is loaded once per process, from `ORT_DYLIB_PATH` when it is set (it must
//!   exist), otherwise from the first Python environment that has PyPI's `onnxruntime` wheel
//!   installed: `$VIRTUAL_ENV`, the environment of `$LLAMAGEN_PYTHON`, then `.venv` in the current
//!   directory, its ancestors, and the ancestors of the running executable. Within one
//!   environment the highest `onnxruntime/capi/libonnxruntime.so.<version>` wins.
//! - A missing library, or one older than the API `ort` needs (ONNX Runtime 1.31), is an error
//!   that names what was tried and says how to install a suitable one.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::error::{FilterError, Result};

/// The command that installs a suitable library into the project environment.
pub const INSTALL_HINT: &str = "install ONNX Runtime with `python3 -m venv .venv && .venv/bin/pip install onnxruntime==1.32.0` \
(or `make setup`, which installs requirements-dev.txt), or set ORT_DYLIB_PATH to a libonnxruntime.so of version 1.31 or newer";

/// Execution provider for inference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// ONNX Runtime's CPU kernels (default; always available).
    #[default]
    Cpu,
    /// NVIDIA CUDA (needs a library with the CUDA provider, e.g. PyPI's `onnxruntime-gpu`).
    Cuda,
}

impl std::str::FromStr for Provider {
    type Err = FilterError;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "cpu" => Ok(Provider::Cpu),
            "cuda" | "gpu" => Ok(Provider::Cuda),
            other => Err(FilterError::Config(format!(
                "unknown execution provider {other:?} (cpu or cuda)"
            ))),
        }
    }
}

/// `libonnxruntime.so.<version>` files in `dir`, highest version first.
fn versioned_libs(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return vec![];
    };
    let mut found: Vec<(Vec<u32>, PathBuf)> = rd
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let v = name.strip_prefix("libonnxruntime.so.")?;
            let parts: Vec<u32> = v
                .split('.')
                .map(|p| p.parse().ok())
                .collect::<Option<_>>()?;
            Some((parts, e.path()))
        })
        .collect();
    found.sort();
    found.into_iter().rev().map(|(_, p)| p).collect()
}

/// The wheel's library inside the Python environment at `venv`, if any.
pub fn library_in_venv(venv: &Path) -> Option<PathBuf> {
    for lib in ["lib", "lib64"] {
        let Ok(rd) = std::fs::read_dir(venv.join(lib)) else {
            continue;
        };
        let mut pys: Vec<PathBuf> = rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("python3"))
            })
            .collect();
        pys.sort();
        for py in pys.iter().rev() {
            if let Some(p) = versioned_libs(&py.join("site-packages/onnxruntime/capi"))
                .into_iter()
                .next()
            {
                return Some(p);
            }
        }
    }
    None
}

/// Python environments searched when `ORT_DYLIB_PATH` is unset, in order.
fn candidate_venvs() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(v) = std::env::var_os("VIRTUAL_ENV") {
        out.push(PathBuf::from(v));
    }
    if let Some(py) = std::env::var_os("LLAMAGEN_PYTHON") {
        // <venv>/bin/python
        if let Some(v) = Path::new(&py).parent().and_then(Path::parent) {
            out.push(v.to_path_buf());
        }
    }
    let mut roots = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        roots.push(cwd);
    }
    if let Ok(exe) = std::env::current_exe() {
        if let Some(d) = exe.parent() {
            roots.push(d.to_path_buf());
        }
    }
    for r in roots {
        for a in r.ancestors() {
            out.push(a.join(".venv"));
        }
    }
    out
}

/// Where the library will be loaded from (see the module invariants).
pub fn locate_library() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        return Err(FilterError::RuntimeLibrary(format!(
            "ORT_DYLIB_PATH={} does not exist; {INSTALL_HINT}",
            p.display()
        )));
    }
    let venvs = candidate_venvs();
    for v in &venvs {
        if let Some(p) = library_in_venv(v) {
            return Ok(p);
        }
    }
    Err(FilterError::RuntimeLibrary(format!(
        "ONNX Runtime library not found: ORT_DYLIB_PATH is unset and no Python environment has \
         the onnxruntime package (looked in {}); {INSTALL_HINT}",
        venvs
            .iter()
            .take(4)
            .map(|v| v.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )))
}

/// The loaded runtime: the library path and the `ort` environment sessions are built in.
pub struct Runtime {
    pub library: PathBuf,
    pub env: ort::environment::Environment,
}

/// Loads the library once per process (see the module invariants).
pub fn runtime() -> Result<&'static Runtime> {
    static RT: OnceLock<std::result::Result<Runtime, String>> = OnceLock::new();
    RT.get_or_init(|| {
        let library = locate_library().map_err(|e| e.to_string())?;
        let builder = ort::init_from(&library).map_err(|e| {
            format!(
                "cannot load ONNX Runtime from {}: {e}; {INSTALL_HINT}",
                library.display()
            )
        })?;
        let env = builder
            .with_name("llamagen-filters")
            .build()
            .map_err(|e| format!("cannot start ONNX Runtime ({}): {e}", library.display()))?;
        Ok(Runtime { library, env })
    })
    .as_ref()
    .map_err(|e| FilterError::RuntimeLibrary(e.clone()))
}

/// Whether the loaded library offers `provider`.
pub fn provider_available(provider: Provider) -> Result<bool> {
    use ort::ep::ExecutionProvider;
    runtime()?;
    match provider {
        Provider::Cpu => Ok(true),
        Provider::Cuda => ort::ep::CUDA::is_available().map_err(|e| FilterError::Onnx {
            model: "-".into(),
            message: e.to_string(),
        }),
    }
}
