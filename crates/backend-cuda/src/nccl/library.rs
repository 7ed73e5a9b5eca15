//! Finding and loading libnccl.so.2, once per process, and naming its result codes.
//!
//! NCCL is loaded by name at the first communicator, not linked: a run without tensor parallelism
//! (and every test that makes no communicator) never needs the library, which is 200+ MB and not
//! on every GPU machine's loader path. Where it is looked for, in order:
//! 1. `PAGODA_NCCL_LIBRARY`, the path of the library file (when set, the only place looked);
//! 2. `libnccl.so.2` through the dynamic loader (`LD_LIBRARY_PATH`, the ld.so cache);
//! 3. the library beside the headers the build read (pip's wheel in `.cuda/venv` after
//!    `scripts/setup-cuda.sh`), if that file exists on this machine.
//!
//! Any NCCL 2 from [`MIN_VERSION`] on will do: the functions called here have kept their ABI, and
//! the communicator options are sized for the library to read only what it knows.

use std::sync::OnceLock;

use super::sys;
use super::NcclError;

/// The variable naming the library file to load, overriding the search.
pub const ENV_NCCL_LIBRARY: &str = "PAGODA_NCCL_LIBRARY";

/// The oldest NCCL loaded: 2.14 brought non-blocking communicators, which keep every rank from
/// blocking inside NCCL on a peer that never comes.
pub const MIN_VERSION: (u32, u32, u32) = (2, 14, 0);

/// Where the build found the library (empty if nowhere).
const BUILD_LIBRARY: &str = env!("PAGODA_NCCL_BUILD_LIBRARY");

/// The loaded library.
pub(crate) struct Nccl {
    pub api: sys::NcclLibrary,
    /// (major, minor, patch).
    pub version: (u32, u32, u32),
    /// Where it was loaded from, as it was asked for.
    pub path: String,
}

impl std::fmt::Debug for Nccl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (major, minor, patch) = self.version;
        write!(f, "NCCL {major}.{minor}.{patch} ({})", self.path)
    }
}

/// The process's NCCL, loaded at the first call. A failure is remembered (and returned again).
pub(crate) fn nccl() -> Result<&'static Nccl, NcclError> {
    static NCCL: OnceLock<Result<Nccl, String>> = OnceLock::new();
    NCCL.get_or_init(load).as_ref().map_err(|why| NcclError::Library(why.clone()))
}

/// The files to try, in order.
fn candidates(env: Option<String>, build: &str) -> Vec<String> {
    if let Some(path) = env.filter(|p| !p.is_empty()) {
        return vec![path];
    }
    let mut names = vec!["libnccl.so.2".to_string()];
    if !build.is_empty() && std::path::Path::new(build).is_file() {
        names.push(build.to_string());
    }
    names
}

fn load() -> Result<Nccl, String> {
    let env = std::env::var(ENV_NCCL_LIBRARY).ok();
    let from_env = env.as_deref().is_some_and(|p| !p.is_empty());
    let mut tried = Vec::new();
    for path in candidates(env, BUILD_LIBRARY) {
        // SAFETY: loading runs the library's initialisers; libnccl's only set up its own state.
        // The symbols are declared from the nccl.h of a version whose ABI these calls share.
        match unsafe { sys::NcclLibrary::new(&path) } {
            Ok(api) => {
                let version = library_version(&api).map_err(|why| format!("{path}: {why}"))?;
                if version < MIN_VERSION {
                    return Err(format!(
                        "{path} is NCCL {}, older than the {} this backend needs (non-blocking communicators)",
                        dotted(version),
                        dotted(MIN_VERSION)
                    ));
                }
                return Ok(Nccl { api, version, path });
            }
            Err(e) => tried.push(format!("{path}: {e}")),
        }
    }
    let hint = if from_env {
        format!("{ENV_NCCL_LIBRARY} names a file that does not load")
    } else {
        format!(
            "set {ENV_NCCL_LIBRARY} to the path of libnccl.so.2, or put its folder on LD_LIBRARY_PATH (pip's \
             nvidia-nccl-cu13 has it in site-packages/nvidia/nccl/lib: `python3 -c 'import nvidia.nccl, os; \
             print(os.path.join(list(nvidia.nccl.__path__)[0], \"lib\"))'` prints the folder)"
        )
    };
    Err(format!(
        "NCCL (libnccl.so.2) is needed for tensor parallelism on CUDA and did not load: {hint}; tried {}",
        tried.join("; ")
    ))
}

fn library_version(api: &sys::NcclLibrary) -> Result<(u32, u32, u32), String> {
    let mut code = 0;
    // SAFETY: a valid out-pointer; ncclGetVersion initialises nothing.
    let r = unsafe { api.ncclGetVersion(&mut code) };
    if r != sys::ncclSuccess {
        return Err(format!("ncclGetVersion failed ({})", result_name(r)));
    }
    decode_version(code).ok_or_else(|| format!("ncclGetVersion gave {code}, not a version code"))
}

/// `NCCL_VERSION_CODE` as (major, minor, patch): `X*1000 + Y*100 + Z` up to 2.8, `X*10000 +
/// Y*100 + Z` since 2.9.
pub(crate) fn decode_version(code: i32) -> Option<(u32, u32, u32)> {
    let code = u32::try_from(code).ok().filter(|&c| c > 0)?;
    Some(if code >= 10_000 {
        (code / 10_000, code / 100 % 100, code % 100)
    } else {
        (code / 1000, code / 100 % 10, code % 100)
    })
}

pub(crate) fn dotted((major, minor, patch): (u32, u32, u32)) -> String {
    format!("{major}.{minor}.{patch}")
}

/// The C name of an `ncclResult_t`, with what it usually means.
pub(crate) fn result_name(code: sys::ncclResult_t) -> &'static str {
    match code {
        sys::ncclSuccess => "ncclSuccess",
        sys::ncclUnhandledCudaError => "ncclUnhandledCudaError (a CUDA call failed)",
        sys::ncclSystemError => "ncclSystemError (a system call failed: socket, memory, shared memory...)",
        sys::ncclInternalError => "ncclInternalError",
        sys::ncclInvalidArgument => "ncclInvalidArgument",
        sys::ncclInvalidUsage => "ncclInvalidUsage",
        sys::ncclRemoteError => "ncclRemoteError (a peer failed or went away)",
        sys::ncclInProgress => "ncclInProgress",
        _ => "an unknown ncclResult_t",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_codes_decode_in_both_encodings() {
        assert_eq!(decode_version(22809), Some((2, 28, 9)));
        assert_eq!(decode_version(21400), Some((2, 14, 0)));
        assert_eq!(decode_version(2708), Some((2, 7, 8)));
        assert_eq!(decode_version(0), None);
        assert_eq!(decode_version(-5), None);
        assert!(decode_version(21306).unwrap() < MIN_VERSION);
        assert!(decode_version(21400).unwrap() >= MIN_VERSION);
    }

    #[test]
    fn the_header_read_is_nccl_2_at_least_the_minimum() {
        let header = (sys::NCCL_MAJOR, sys::NCCL_MINOR, sys::NCCL_PATCH);
        assert_eq!(decode_version(sys::NCCL_VERSION_CODE as i32), Some(header));
        assert!(header >= MIN_VERSION, "nccl.h is {}", dotted(header));
        assert_eq!(sys::NCCL_UNIQUE_ID_BYTES as usize, super::super::bootstrap::UNIQUE_ID_BYTES);
    }

    #[test]
    fn an_explicit_library_is_the_only_one_tried() {
        assert_eq!(candidates(Some("/x/libnccl.so.2".into()), "/build/libnccl.so.2"), ["/x/libnccl.so.2"]);
        // Empty is unset; a build path that is not a file here is skipped.
        assert_eq!(candidates(Some(String::new()), "/nonexistent/libnccl.so.2"), ["libnccl.so.2"]);
        assert_eq!(candidates(None, ""), ["libnccl.so.2"]);
    }

    #[test]
    fn result_codes_have_their_c_names() {
        assert!(result_name(sys::ncclRemoteError).starts_with("ncclRemoteError"));
        assert!(result_name(sys::ncclUnhandledCudaError).starts_with("ncclUnhandledCudaError"));
        assert_eq!(result_name(99), "an unknown ncclResult_t");
    }

    /// Where the build found the wheel's library (CI: scripts/setup-cuda.sh), it loads here with
    /// no GPU and no driver (only its version and error strings are read). Skipped where the
    /// build found only headers.
    #[test]
    fn the_library_beside_the_headers_loads_and_names_its_errors() {
        if BUILD_LIBRARY.is_empty() || std::env::var_os(ENV_NCCL_LIBRARY).is_some() {
            eprintln!("skipped: the build found no libnccl.so.2 beside nccl.h, or {ENV_NCCL_LIBRARY} is set");
            return;
        }
        let nccl = nccl().unwrap();
        assert!(nccl.version >= MIN_VERSION, "{nccl:?}");
        // SAFETY: ncclGetErrorString returns a static NUL-terminated string.
        let text = unsafe { std::ffi::CStr::from_ptr(nccl.api.ncclGetErrorString(sys::ncclInvalidArgument)) };
        assert!(!text.to_bytes().is_empty());
    }
}
