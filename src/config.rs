//! Settings: embedded defaults, overridden by `HEPAFLOW_*` environment variables.

use crate::volume::ReadLimits;

/// Runtime settings.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Bounds for reading untrusted NIfTI files (`HEPAFLOW_MAX_DECODED_BYTES`).
    pub read_limits: ReadLimits,
}

/// A setting that could not be understood.
#[derive(Debug, thiserror::Error)]
#[error("setting {name} = {value:?}: {reason}")]
pub struct ConfigError {
    pub name: String,
    pub value: String,
    pub reason: String,
}

impl Settings {
    /// Defaults overridden by the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Defaults overridden by `lookup` (the environment, or a map in tests).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let mut s = Settings {
            read_limits: ReadLimits::default(),
        };
        const MAX: &str = "HEPAFLOW_MAX_DECODED_BYTES";
        if let Some(v) = lookup(MAX) {
            s.read_limits.max_decoded_bytes = parse_bytes(&v).ok_or_else(|| ConfigError {
                name: MAX.into(),
                value: v.clone(),
                reason: "expected a positive byte count such as 2147483648, 512M or 2G".into(),
            })?;
        }
        Ok(s)
    }
}

/// `123`, `64K`, `512M`, `2G` (binary multiples).
fn parse_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last()? {
        (i, 'K' | 'k') => (&s[..i], 1u64 << 10),
        (i, 'M' | 'm') => (&s[..i], 1 << 20),
        (i, 'G' | 'g') => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    let n: u64 = num.trim().parse().ok()?;
    n.checked_mul(mult).filter(|&v| v > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_sizes_parse() {
        assert_eq!(parse_bytes("2G"), Some(2 << 30));
        assert_eq!(parse_bytes("512m"), Some(512 << 20));
        assert_eq!(parse_bytes("100"), Some(100));
        assert_eq!(parse_bytes("0"), None);
        assert_eq!(parse_bytes("lots"), None);
    }

    #[test]
    fn bad_value_names_the_setting() {
        let e = Settings::from_lookup(|_| Some("x".into())).unwrap_err();
        assert!(e.to_string().contains("HEPAFLOW_MAX_DECODED_BYTES"));
    }
}
