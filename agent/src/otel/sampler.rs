//! Head sampling, applied by Tapir itself: spans are built after the fact and handed to the
//! exporter directly, so the SDK's sampler never runs. Configured by the standard
//! `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG`.
use opentelemetry::trace::TraceId;

/// The decision for spans without a (valid) remote parent, or for every span when the
/// sampler is not parent-based.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Root {
    AlwaysOn,
    AlwaysOff,
    /// Probability in [0, 1], decided from the trace id like the SDK's `TraceIdRatioBased`
    /// (so every agent and SDK with the same ratio takes the same decision for a trace).
    TraceIdRatio(f64),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampler {
    pub root: Root,
    /// `parentbased_*`: a remote parent's sampled flag decides (sampled → on, not → off).
    pub parent_based: bool,
}

impl Default for Sampler {
    /// The specification's default: `parentbased_always_on`.
    fn default() -> Self {
        Self {
            root: Root::AlwaysOn,
            parent_based: true,
        }
    }
}

impl Sampler {
    /// From the values of `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG`. Unknown or
    /// unsupported samplers fall back to the default; a missing or invalid ratio to 1.0.
    /// Returns a warning to log when a value was not understood.
    pub fn from_env_values(sampler: Option<&str>, arg: Option<&str>) -> (Self, Option<String>) {
        let name = sampler.map(str::trim).unwrap_or("").to_ascii_lowercase();
        let mut warning = None;
        let mut ratio = || -> f64 {
            match arg.map(str::trim).filter(|a| !a.is_empty()) {
                None => 1.0,
                Some(a) => match a.parse::<f64>() {
                    Ok(r) if (0.0..=1.0).contains(&r) => r,
                    _ => {
                        warning = Some(format!(
                            "OTEL_TRACES_SAMPLER_ARG={a:?} is not a probability in [0, 1]; using 1.0"
                        ));
                        1.0
                    }
                },
            }
        };
        let s = match name.as_str() {
            "" => Self::default(),
            "always_on" => Self::plain(Root::AlwaysOn),
            "always_off" => Self::plain(Root::AlwaysOff),
            "traceidratio" => Self::plain(Root::TraceIdRatio(ratio())),
            "parentbased_always_on" => Self::parent_based(Root::AlwaysOn),
            "parentbased_always_off" => Self::parent_based(Root::AlwaysOff),
            "parentbased_traceidratio" => Self::parent_based(Root::TraceIdRatio(ratio())),
            other => {
                return (
                    Self::default(),
                    Some(format!(
                        "OTEL_TRACES_SAMPLER={other:?} is not supported by tapir; using parentbased_always_on"
                    )),
                )
            }
        };
        (s, warning)
    }

    /// Reads `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG` from this process.
    pub fn from_env() -> (Self, Option<String>) {
        let s = std::env::var("OTEL_TRACES_SAMPLER").ok();
        let a = std::env::var("OTEL_TRACES_SAMPLER_ARG").ok();
        Self::from_env_values(s.as_deref(), a.as_deref())
    }

    fn plain(root: Root) -> Self {
        Self {
            root,
            parent_based: false,
        }
    }

    fn parent_based(root: Root) -> Self {
        Self {
            root,
            parent_based: true,
        }
    }

    /// Whether to record a span of `trace_id`; `remote_parent_sampled` is the sampled flag
    /// of a valid incoming `traceparent`, `None` without one.
    pub fn should_sample(&self, trace_id: TraceId, remote_parent_sampled: Option<bool>) -> bool {
        if self.parent_based {
            if let Some(sampled) = remote_parent_sampled {
                return sampled;
            }
        }
        match self.root {
            Root::AlwaysOn => true,
            Root::AlwaysOff => false,
            Root::TraceIdRatio(r) => ratio_decision(trace_id, r),
        }
    }

    /// The name as in `OTEL_TRACES_SAMPLER`, for the start-up log.
    pub fn describe(&self) -> String {
        let root = match self.root {
            Root::AlwaysOn => "always_on".to_string(),
            Root::AlwaysOff => "always_off".to_string(),
            Root::TraceIdRatio(r) => format!("traceidratio({r})"),
        };
        if self.parent_based {
            format!("parentbased_{root}")
        } else {
            root
        }
    }
}

/// The SDK's `TraceIdRatioBased` rule: the low 63 bits of the trace id's last 8 bytes
/// against `ratio × 2^63`.
fn ratio_decision(trace_id: TraceId, ratio: f64) -> bool {
    if ratio >= 1.0 {
        return true;
    }
    if ratio.is_nan() || ratio <= 0.0 {
        return false;
    }
    let bound = (ratio * (1u64 << 63) as f64) as u64;
    let bytes = trace_id.to_bytes();
    let low = u64::from_be_bytes(bytes[8..16].try_into().unwrap_or([0; 8])) >> 1;
    low < bound
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u128) -> TraceId {
        TraceId::from(n)
    }

    fn env(s: &str, a: Option<&str>) -> Sampler {
        Sampler::from_env_values(Some(s), a).0
    }

    #[test]
    fn default_is_parentbased_always_on() {
        let (s, w) = Sampler::from_env_values(None, None);
        assert_eq!(s, Sampler::default());
        assert!(w.is_none());
        assert!(s.should_sample(id(1), None));
        assert!(s.should_sample(id(1), Some(true)));
        assert!(!s.should_sample(id(1), Some(false)));
        assert_eq!(s.describe(), "parentbased_always_on");
    }

    #[test]
    fn always_on_and_off_ignore_the_parent() {
        let on = env("always_on", None);
        assert!(on.should_sample(id(5), Some(false)));
        assert!(on.should_sample(id(5), None));
        let off = env("always_off", None);
        assert!(!off.should_sample(id(5), Some(true)));
        assert!(!off.should_sample(id(5), None));
    }

    #[test]
    fn parentbased_always_off_follows_the_parent_else_drops() {
        let s = env("parentbased_always_off", None);
        assert!(s.should_sample(id(5), Some(true)));
        assert!(!s.should_sample(id(5), Some(false)));
        assert!(!s.should_sample(id(5), None));
    }

    #[test]
    fn traceidratio_uses_the_low_bits_of_the_trace_id() {
        let s = env("traceidratio", Some("0.5"));
        assert_eq!(s.root, Root::TraceIdRatio(0.5));
        // low 8 bytes >> 1 below 2^62 → sampled; above → not.
        assert!(s.should_sample(id(0x1234 << 64 | 2), None));
        assert!(!s.should_sample(id(u64::MAX as u128), None));
        // Not parent-based: the parent's flag does not matter.
        assert!(!s.should_sample(id(u64::MAX as u128), Some(true)));
        // Deterministic per trace id, and about the ratio over many ids.
        let n = 10_000u128;
        let hits = (0..n)
            .filter(|i| {
                s.should_sample(
                    id(i.wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835)),
                    None,
                )
            })
            .count();
        assert!((4_000..6_000).contains(&hits), "{hits}");
        assert!(!env("traceidratio", Some("0")).should_sample(id(1), None));
        assert!(env("traceidratio", Some("1")).should_sample(id(u128::MAX), None));
    }

    #[test]
    fn parentbased_traceidratio() {
        let s = env("parentbased_traceidratio", Some("0.0"));
        assert!(s.parent_based);
        assert!(s.should_sample(id(7), Some(true)));
        assert!(!s.should_sample(id(7), None));
        let s = env("PARENTBASED_TRACEIDRATIO", Some(" 1.0 "));
        assert!(s.should_sample(id(7), None));
        assert!(!s.should_sample(id(7), Some(false)));
    }

    #[test]
    fn bad_values_fall_back_with_a_warning() {
        let (s, w) = Sampler::from_env_values(Some("jaeger_remote"), None);
        assert_eq!(s, Sampler::default());
        assert!(w.unwrap().contains("jaeger_remote"));
        let (s, w) = Sampler::from_env_values(Some("traceidratio"), Some("2"));
        assert_eq!(s.root, Root::TraceIdRatio(1.0));
        assert!(w.is_some());
        let (s, w) = Sampler::from_env_values(Some("traceidratio"), Some("half"));
        assert_eq!(s.root, Root::TraceIdRatio(1.0));
        assert!(w.is_some());
        let (s, _) = Sampler::from_env_values(Some("traceidratio"), None);
        assert_eq!(s.root, Root::TraceIdRatio(1.0));
    }
}
