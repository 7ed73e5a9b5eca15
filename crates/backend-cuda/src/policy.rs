//! The kernel policy: how the launchers of one device choose kernels, as data.
//!
//! A [`KernelPolicy`] is resolved once per device, when the [`CudaBackend`]
//! is created, and passed to every C launcher (`PagodaKernelPolicy` in
//! `csrc/pagoda_kernels.h`); nothing in C reads the environment or asks the
//! driver which device is current. Each switch comes from the first of:
//!
//! 1. the caller's [`KernelOptions`] (`pagoda`'s `--kernel-*` flags, through
//!    [`CudaBackend::with_kernel_options`]);
//! 2. the `PAGODA_*` environment variables, read once at backend creation
//!    ([`KernelOptions::from_env`]);
//! 3. the device: its SM count, and PDL only where the compute capability has
//!    it (sm_90 and newer); every kernel on, decode partitions chosen per launch.
//!
//! ```
//! use pagoda_backend_cuda::{DecodePartition, DeviceFacts, KernelOptions, KernelPolicy};
//!
//! let flags = KernelOptions { pdl: Some(false), ..KernelOptions::default() };
//! let env = KernelOptions {
//!     decode_partition: Some(DecodePartition::Tokens(64)),
//!     pdl: Some(true),
//!     ..KernelOptions::default()
//! };
//! let h100 = DeviceFacts { num_sms: 132, compute_capability: (9, 0) };
//! let policy = KernelPolicy::resolve(flags, env, h100);
//! assert_eq!(policy.use_pdl, false);
//! assert_eq!(policy.decode_partition, Some(64));
//! ```
//!
//! [`CudaBackend`]: crate::CudaBackend
//! [`CudaBackend::with_kernel_options`]: crate::CudaBackend::with_kernel_options

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

use crate::ffi;

/// Context tokens per decode-attention partition that the kernels are built for.
pub const DECODE_PARTITIONS: [u32; 5] = [64, 128, 256, 512, 1024];

/// `PAGODA_DECODE_PARTITION=auto|64|128|256|512|1024`: forces the decode partition.
pub const ENV_DECODE_PARTITION: &str = "PAGODA_DECODE_PARTITION";
/// `PAGODA_DISABLE_PDL=1`: plain launches instead of programmatic dependent launch.
pub const ENV_DISABLE_PDL: &str = "PAGODA_DISABLE_PDL";
/// `PAGODA_DISABLE_GEMV=1`: cuBLAS for every product, the small-batch GEMV off.
pub const ENV_DISABLE_GEMV: &str = "PAGODA_DISABLE_GEMV";
/// `PAGODA_GEMV_MMA_MIN_TOKENS=N` (1..=17): the fewest token rows a product
/// needs to take the tensor-core GEMV (17: never).
pub const ENV_GEMV_MMA_MIN_TOKENS: &str = "PAGODA_GEMV_MMA_MIN_TOKENS";
/// `PAGODA_DECODE_ATTENTION_MMA=1|0`: decode attention over an FP8 cache on
/// the tensor cores (1) or the CUDA cores (0).
pub const ENV_DECODE_ATTENTION_MMA: &str = "PAGODA_DECODE_ATTENTION_MMA";

/// The most token rows the tensor-core GEMV takes (`MMA_GEMV_MAX_TOKENS` in `csrc/gemm.cu`).
pub const GEMV_MMA_MAX_TOKENS: u32 = 16;
/// The device default of [`KernelPolicy::gemv_mma_min_tokens`]: products of
/// this many rows or more run on the tensor cores, fewer on the CUDA-core
/// GEMV. The kernel bench's `linear` rows compare them (PERF.md, v12): at 2
/// rows the CUDA-core GEMV is faster for every product of the 8B layer, at 5
/// the tensor-core one for all but the widest.
pub const DEFAULT_GEMV_MMA_MIN_TOKENS: u32 = 3;

/// How decode attention splits each sequence's context.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodePartition {
    /// Chosen per launch from the batch, the context and the SM count.
    Auto,
    /// This many context tokens per partition, one of [`DECODE_PARTITIONS`].
    Tokens(u32),
}

impl FromStr for DecodePartition {
    type Err = String;

    /// `auto` or one of [`DECODE_PARTITIONS`].
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("auto") {
            return Ok(Self::Auto);
        }
        match s.parse::<u32>() {
            Ok(n) if DECODE_PARTITIONS.contains(&n) => Ok(Self::Tokens(n)),
            _ => Err(format!("{s:?}: expected auto, 64, 128, 256, 512 or 1024")),
        }
    }
}

impl fmt::Display for DecodePartition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Tokens(n) => write!(f, "{n}"),
        }
    }
}

/// Kernel switches a caller may set; `None` leaves a switch to the next
/// source (the environment, then the device).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOptions {
    /// Tokens per decode-attention partition, or [`DecodePartition::Auto`].
    pub decode_partition: Option<DecodePartition>,
    /// Programmatic dependent launch (taken only on sm_90 and newer).
    pub pdl: Option<bool>,
    /// The weight-streaming GEMVs for products of few token rows (off: cuBLAS).
    pub gemv: Option<bool>,
    /// The fewest token rows that take the tensor-core GEMV (1..=17; 17: never).
    pub gemv_mma_min_tokens: Option<u32>,
    /// Decode attention over an FP8 cache on the tensor cores.
    pub decode_attention_mma: Option<bool>,
}

/// An environment variable with a value the backend does not understand.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("{variable}={value:?}: {expected}")]
pub struct KernelEnvError {
    pub variable: &'static str,
    pub value: String,
    pub expected: String,
}

impl KernelOptions {
    /// The switches the `PAGODA_*` variables set: [`ENV_DECODE_PARTITION`]
    /// (`auto`, `64`, ... `1024`), [`ENV_DISABLE_PDL`] and [`ENV_DISABLE_GEMV`]
    /// (`1` turns the feature off; `0` or empty leaves it to the device),
    /// [`ENV_GEMV_MMA_MIN_TOKENS`] (`1` to `17`), [`ENV_DECODE_ATTENTION_MMA`]
    /// (`1` on, `0` off).
    /// Unset or empty variables set nothing; any other value is an error.
    pub fn from_env() -> Result<Self, KernelEnvError> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// [`KernelOptions::from_env`] over any source of variables (tests).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self, KernelEnvError> {
        let set = |name: &'static str| var(name).filter(|v| !v.trim().is_empty());
        let decode_partition = set(ENV_DECODE_PARTITION)
            .map(|v| {
                v.parse().map_err(|_| KernelEnvError {
                    variable: ENV_DECODE_PARTITION,
                    value: v.clone(),
                    expected: "expected auto, 64, 128, 256, 512 or 1024".into(),
                })
            })
            .transpose()?;
        // A `1` or `0` variable; `meaning` names what each does in the error.
        let bit = |name: &'static str, meaning: &str| -> Result<Option<bool>, KernelEnvError> {
            match set(name).as_deref().map(str::trim) {
                None => Ok(None),
                Some("1") => Ok(Some(true)),
                Some("0") => Ok(Some(false)),
                Some(other) => Err(KernelEnvError {
                    variable: name,
                    value: other.to_string(),
                    expected: format!("expected {meaning}"),
                }),
            }
        };
        // `1` turns the feature off; `0` leaves it to the device.
        let disable =
            |name: &'static str| Ok(bit(name, "1 (off) or 0")?.and_then(|one| one.then_some(false)));
        let gemv_mma_min_tokens = set(ENV_GEMV_MMA_MIN_TOKENS)
            .map(|v| match v.trim().parse::<u32>() {
                Ok(n) if (1..=GEMV_MMA_MAX_TOKENS + 1).contains(&n) => Ok(n),
                _ => Err(KernelEnvError {
                    variable: ENV_GEMV_MMA_MIN_TOKENS,
                    value: v.clone(),
                    expected: format!("expected a row count from 1 to {} (never)", GEMV_MMA_MAX_TOKENS + 1),
                }),
            })
            .transpose()?;
        let decode_attention_mma = bit(ENV_DECODE_ATTENTION_MMA, "1 (on) or 0 (off)")?;
        Ok(Self {
            decode_partition,
            pdl: disable(ENV_DISABLE_PDL)?,
            gemv: disable(ENV_DISABLE_GEMV)?,
            gemv_mma_min_tokens,
            decode_attention_mma,
        })
    }

    /// Each switch from `self` where set, else from `fallback`.
    pub fn or(self, fallback: Self) -> Self {
        Self {
            decode_partition: self.decode_partition.or(fallback.decode_partition),
            pdl: self.pdl.or(fallback.pdl),
            gemv: self.gemv.or(fallback.gemv),
            gemv_mma_min_tokens: self.gemv_mma_min_tokens.or(fallback.gemv_mma_min_tokens),
            decode_attention_mma: self.decode_attention_mma.or(fallback.decode_attention_mma),
        }
    }
}

/// What the policy needs to know about a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceFacts {
    /// Streaming multiprocessors.
    pub num_sms: u32,
    /// (major, minor), e.g. (9, 0) for H100.
    pub compute_capability: (u32, u32),
}

impl DeviceFacts {
    /// Whether kernels may be launched with programmatic stream serialization.
    pub fn supports_pdl(&self) -> bool {
        self.compute_capability.0 >= 9
    }
}

/// How the launchers choose kernels on one device; see the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelPolicy {
    /// SMs of this device (at least 1): decode partitions and greedy-sampling grids are sized by it.
    pub num_sms: u32,
    /// Kernels launched with programmatic dependent launch (never before sm_90).
    pub use_pdl: bool,
    /// Products of few token rows go to a weight-streaming GEMV.
    pub use_gemv: bool,
    /// With `use_gemv`: products of this many token rows up to
    /// [`GEMV_MMA_MAX_TOKENS`] take the tensor-core GEMV, fewer (up to 8)
    /// the CUDA-core one.
    pub gemv_mma_min_tokens: u32,
    /// Tokens per decode partition, forced; `None` chooses per launch.
    pub decode_partition: Option<u32>,
    /// Decode attention over an FP8 cache computes q.k and p.v on the tensor
    /// cores (f16 operands, f32 sums). Off by default until measured on a GPU.
    pub decode_attention_mma: bool,
}

impl KernelPolicy {
    /// Each switch from `flags`, else `env`, else the device's default: PDL
    /// where the device has it, the GEMV on, decode partitions chosen per launch.
    /// PDL stays off on a device without it whatever was asked.
    pub fn resolve(flags: KernelOptions, env: KernelOptions, device: DeviceFacts) -> Self {
        let asked = flags.or(env);
        Self {
            num_sms: device.num_sms.max(1),
            use_pdl: asked.pdl.unwrap_or(true) && device.supports_pdl(),
            use_gemv: asked.gemv.unwrap_or(true),
            gemv_mma_min_tokens: asked
                .gemv_mma_min_tokens
                .unwrap_or(DEFAULT_GEMV_MMA_MIN_TOKENS)
                .clamp(1, GEMV_MMA_MAX_TOKENS + 1),
            decode_partition: match asked.decode_partition {
                Some(DecodePartition::Tokens(n)) => Some(n),
                Some(DecodePartition::Auto) | None => None,
            },
            decode_attention_mma: asked.decode_attention_mma.unwrap_or(false),
        }
    }

    /// The struct every launcher takes.
    pub(crate) fn to_ffi(self) -> ffi::PagodaKernelPolicy {
        ffi::PagodaKernelPolicy {
            num_sms: i32::try_from(self.num_sms).unwrap_or(i32::MAX),
            use_pdl: self.use_pdl as i32,
            use_gemv: self.use_gemv as i32,
            gemv_mma_min_tokens: self.gemv_mma_min_tokens as i32,
            decode_partition: self.decode_partition.map_or(0, |p| p as i32),
            decode_attention_mma: self.decode_attention_mma as i32,
        }
    }
}

impl fmt::Display for KernelPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let on = |b: bool| if b { "on" } else { "off" };
        write!(
            f,
            "{} SMs, PDL {}, GEMV {} (tensor cores from {} rows), decode partition {}, FP8 decode attention on {}",
            self.num_sms,
            on(self.use_pdl),
            on(self.use_gemv),
            self.gemv_mma_min_tokens,
            self.decode_partition.map_or(DecodePartition::Auto, DecodePartition::Tokens),
            if self.decode_attention_mma { "tensor cores" } else { "CUDA cores" }
        )
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    const H100: DeviceFacts = DeviceFacts { num_sms: 132, compute_capability: (9, 0) };
    const A100: DeviceFacts = DeviceFacts { num_sms: 108, compute_capability: (8, 0) };

    /// The device default: every kernel on, partitions chosen per launch.
    fn all_on(num_sms: u32) -> KernelPolicy {
        KernelPolicy {
            num_sms,
            use_pdl: true,
            use_gemv: true,
            gemv_mma_min_tokens: DEFAULT_GEMV_MMA_MIN_TOKENS,
            decode_partition: None,
            decode_attention_mma: false,
        }
    }

    fn env(vars: &[(&str, &str)]) -> Result<KernelOptions, KernelEnvError> {
        let vars: HashMap<String, String> =
            vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        KernelOptions::from_vars(|name| vars.get(name).cloned())
    }

    #[test]
    fn the_device_decides_when_nothing_is_asked() {
        let none = KernelOptions::default();
        let p = KernelPolicy::resolve(none, none, H100);
        assert_eq!(p, all_on(132));
        let p = KernelPolicy::resolve(none, none, A100);
        assert_eq!(
            p,
            KernelPolicy {
                num_sms: 108,
                use_pdl: false,
                use_gemv: true,
                gemv_mma_min_tokens: DEFAULT_GEMV_MMA_MIN_TOKENS,
                decode_partition: None,
                decode_attention_mma: false
            }
        );
        assert_eq!(p.to_ffi().num_sms, 108);
        assert_eq!(p.to_ffi().decode_partition, 0);
    }

    #[test]
    fn the_tensor_core_fp8_decode_is_asked_for_by_name() {
        let none = KernelOptions::default();
        assert!(!KernelPolicy::resolve(none, none, H100).decode_attention_mma, "off until measured");
        let on = env(&[(ENV_DECODE_ATTENTION_MMA, "1")]).unwrap();
        let p = KernelPolicy::resolve(none, on, H100);
        assert!(p.decode_attention_mma);
        assert_eq!(p.to_ffi().decode_attention_mma, 1);
        let off = KernelOptions { decode_attention_mma: Some(false), ..none };
        assert!(!KernelPolicy::resolve(off, on, H100).decode_attention_mma, "a flag wins");
        let err = env(&[(ENV_DECODE_ATTENTION_MMA, "yes")]).unwrap_err();
        assert_eq!(err.variable, ENV_DECODE_ATTENTION_MMA);
    }

    #[test]
    fn the_environment_overrides_the_device() {
        let vars =
            env(&[(ENV_DECODE_PARTITION, "256"), (ENV_DISABLE_PDL, "1"), (ENV_DISABLE_GEMV, "1")]).unwrap();
        let p = KernelPolicy::resolve(KernelOptions::default(), vars, H100);
        assert_eq!(
            p,
            KernelPolicy {
                num_sms: 132,
                use_pdl: false,
                use_gemv: false,
                gemv_mma_min_tokens: DEFAULT_GEMV_MMA_MIN_TOKENS,
                decode_partition: Some(256),
                decode_attention_mma: false
            }
        );
        let ffi = p.to_ffi();
        assert_eq!((ffi.use_pdl, ffi.use_gemv, ffi.decode_partition), (0, 0, 256));
    }

    #[test]
    fn flags_override_the_environment_either_way() {
        let vars =
            env(&[(ENV_DECODE_PARTITION, "64"), (ENV_DISABLE_PDL, "1"), (ENV_DISABLE_GEMV, "1")]).unwrap();
        let flags = KernelOptions {
            decode_partition: Some(DecodePartition::Auto),
            pdl: Some(true),
            gemv: Some(true),
            gemv_mma_min_tokens: None,
            decode_attention_mma: None,
        };
        let p = KernelPolicy::resolve(flags, vars, H100);
        assert_eq!(p, all_on(132));
        // A flag set on one switch leaves the others to the environment.
        let flags =
            KernelOptions { decode_partition: Some(DecodePartition::Tokens(1024)), ..Default::default() };
        let p = KernelPolicy::resolve(flags, vars, H100);
        assert_eq!(
            p,
            KernelPolicy {
                num_sms: 132,
                use_pdl: false,
                use_gemv: false,
                gemv_mma_min_tokens: DEFAULT_GEMV_MMA_MIN_TOKENS,
                decode_partition: Some(1024),
                decode_attention_mma: false
            }
        );
    }

    #[test]
    fn pdl_is_never_used_where_the_device_lacks_it() {
        let flags = KernelOptions { pdl: Some(true), ..Default::default() };
        assert!(!KernelPolicy::resolve(flags, KernelOptions::default(), A100).use_pdl);
        let zero_sms = DeviceFacts { num_sms: 0, compute_capability: (9, 0) };
        assert_eq!(KernelPolicy::resolve(flags, KernelOptions::default(), zero_sms).num_sms, 1);
    }

    #[test]
    fn environment_values_are_checked() {
        assert_eq!(env(&[]).unwrap(), KernelOptions::default());
        assert_eq!(
            env(&[(ENV_DISABLE_PDL, "0"), (ENV_DISABLE_GEMV, ""), (ENV_DECODE_PARTITION, " ")]).unwrap(),
            { KernelOptions::default() }
        );
        assert_eq!(
            env(&[(ENV_DECODE_PARTITION, "auto")]).unwrap().decode_partition,
            Some(DecodePartition::Auto)
        );
        let e = env(&[(ENV_DECODE_PARTITION, "100")]).unwrap_err();
        assert_eq!(e.variable, ENV_DECODE_PARTITION);
        assert!(e.to_string().contains("PAGODA_DECODE_PARTITION=\"100\""), "{e}");
        assert_eq!(env(&[(ENV_DISABLE_PDL, "yes")]).unwrap_err().variable, ENV_DISABLE_PDL);
        assert_eq!(env(&[(ENV_DISABLE_GEMV, "true")]).unwrap_err().variable, ENV_DISABLE_GEMV);
        assert_eq!(env(&[(ENV_GEMV_MMA_MIN_TOKENS, "17")]).unwrap().gemv_mma_min_tokens, Some(17));
        for bad in ["0", "18", "two"] {
            let e = env(&[(ENV_GEMV_MMA_MIN_TOKENS, bad)]).unwrap_err();
            assert_eq!(e.variable, ENV_GEMV_MMA_MIN_TOKENS, "{bad}");
        }
    }

    #[test]
    fn decode_partitions_parse_and_print() {
        for n in DECODE_PARTITIONS {
            let p: DecodePartition = n.to_string().parse().unwrap();
            assert_eq!(p, DecodePartition::Tokens(n));
            assert_eq!(p.to_string(), n.to_string());
        }
        assert_eq!("AUTO".parse::<DecodePartition>(), Ok(DecodePartition::Auto));
        assert!("32".parse::<DecodePartition>().is_err());
        assert!("".parse::<DecodePartition>().is_err());
        let p = KernelPolicy {
            num_sms: 132,
            use_pdl: true,
            use_gemv: false,
            gemv_mma_min_tokens: DEFAULT_GEMV_MMA_MIN_TOKENS,
            decode_partition: None,
            decode_attention_mma: false,
        };
        assert_eq!(
            p.to_string(),
            "132 SMs, PDL on, GEMV off (tensor cores from 3 rows), decode partition auto, FP8 decode attention \
             on CUDA cores"
        );
    }
}
