//! Byte sizes written as text (`4GB`, `512 MiB`, `1.5G`, `4096`): the one parser behind every
//! command-line flag, config file and Python `setup` argument that takes a size.
//!
//! # Rules
//! - A number, optional spaces, an optional unit; spaces around the whole are ignored.
//! - The number is decimal digits with an optional fraction (`1.5`, `.5`, `2.`); no sign, no
//!   exponent. A fraction of a byte is dropped (`1.5` is 1 byte, `0.3KB` is 307 bytes), as
//!   upstream's parser truncates.
//! - Units are case-insensitive and powers of 1024, as in upstream Mooncake's
//!   `string_to_byte_size` (`mooncake-store/include/utils.h`): `B`; `K`, `KB`, `KiB`; `M`, `MB`,
//!   `MiB`; `G`, `GB`, `GiB`; `T`, `TB`, `TiB`. Upstream does not know the `iB` spellings; they
//!   are accepted here because they mean the same numbers.
//! - Errors instead of upstream's silent 0: an empty string, a negative number, a missing number,
//!   an unknown unit, and a size past `u64::MAX` bytes are each a [`SizeError`]. Upstream's
//!   `infinite` (a quota, not a buffer size) is not accepted.
//!
//! Zero is a valid size (`global_segment_size=0` is a client that contributes no memory); callers
//! that need a positive size check for it.
//!
//! ```
//! use mooncake_core::size::{format_size, parse_size};
//! assert_eq!(parse_size("4GB"), Ok(4 << 30));
//! assert_eq!(parse_size("512 mib"), Ok(512 << 20));
//! assert_eq!(parse_size("1.5G"), Ok(3 << 29));
//! assert_eq!(parse_size("4096"), Ok(4096));
//! assert!(parse_size("50%").is_err());
//! assert_eq!(format_size(16 << 20), "16MB");
//! ```

/// Why a text is not a size. Each message quotes the text.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    /// Nothing but spaces.
    #[error("empty size (expected e.g. 4096, 16MB, 4GB)")]
    Empty,
    /// A leading minus sign.
    #[error("{0:?} is negative (a size is a number of bytes)")]
    Negative(String),
    /// No digits before the unit (`GB`, `.MB`, `1e9`).
    #[error("{0:?} is not a size (expected e.g. 4096, 16MB, 4GB)")]
    NotANumber(String),
    /// A unit that is not one of B, K/KB/KiB, M/MB/MiB, G/GB/GiB, T/TB/TiB.
    #[error("{text:?} has an unknown unit {unit:?} (expected B, KB, MB, GB or TB)")]
    UnknownUnit {
        /// The whole text.
        text: String,
        /// The part after the number.
        unit: String,
    },
    /// More bytes than a `u64` holds.
    #[error("{0:?} is too large (more than 2^64 - 1 bytes)")]
    Overflow(String),
}

/// The units [`parse_size`] knows, in lower case, with their multipliers.
const UNITS: &[(&str, u64)] = &[
    ("", 1),
    ("b", 1),
    ("k", 1 << 10),
    ("kb", 1 << 10),
    ("kib", 1 << 10),
    ("m", 1 << 20),
    ("mb", 1 << 20),
    ("mib", 1 << 20),
    ("g", 1 << 30),
    ("gb", 1 << 30),
    ("gib", 1 << 30),
    ("t", 1 << 40),
    ("tb", 1 << 40),
    ("tib", 1 << 40),
];

/// Parses a size in bytes by the [module rules](self).
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let t = text.trim();
    if t.is_empty() {
        return Err(SizeError::Empty);
    }
    if t.starts_with('-') {
        return Err(SizeError::Negative(text.to_owned()));
    }
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if (whole.is_empty() && fraction.is_empty()) || fraction.contains('.') {
        return Err(SizeError::NotANumber(text.to_owned()));
    }
    let unit = unit.trim_start();
    let scale = UNITS
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(unit))
        .map(|&(_, scale)| scale)
        .ok_or_else(|| {
            if unit.starts_with(|c: char| c.is_ascii_alphabetic() || c == '%') {
                SizeError::UnknownUnit {
                    text: text.to_owned(),
                    unit: unit.to_owned(),
                }
            } else {
                SizeError::NotANumber(text.to_owned())
            }
        })?;
    let overflow = || SizeError::Overflow(text.to_owned());
    let whole: u64 = if whole.is_empty() {
        0
    } else {
        // Only digits are left, so a parse failure is an overflow.
        whole.parse().map_err(|_| overflow())?
    };
    whole
        .checked_mul(scale)
        .and_then(|n| n.checked_add(fraction_bytes(fraction, scale)))
        .ok_or_else(overflow)
}

/// `floor(0.<digits> * scale)`, exactly: Horner's rule from the last digit, where flooring each
/// step gives the floor of the whole (`floor((a + floor(x)) / 10) == floor((a + x) / 10)`).
fn fraction_bytes(digits: &str, scale: u64) -> u64 {
    digits.bytes().rev().fold(0, |acc, d| {
        // acc <= scale <= 2^40, so this stays far below u64::MAX.
        (u64::from(d - b'0') * scale + acc) / 10
    })
}

/// Formats a size in the largest unit that divides it exactly (`16MB`, `1536KB`, `4097`), so
/// that [`parse_size`] reads it back unchanged.
pub fn format_size(bytes: u64) -> String {
    const NAMED: [(&str, u64); 4] = [
        ("TB", 1 << 40),
        ("GB", 1 << 30),
        ("MB", 1 << 20),
        ("KB", 1 << 10),
    ];
    NAMED
        .iter()
        .find(|&&(_, scale)| bytes != 0 && bytes % scale == 0)
        .map(|&(unit, scale)| format!("{}{unit}", bytes / scale))
        .unwrap_or_else(|| bytes.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn upstream_spellings() {
        for (text, bytes) in [
            ("0", 0u64),
            ("4096", 4096),
            ("4096B", 4096),
            ("4GB", 4 << 30),
            ("4 GiB", 4 << 30),
            ("4G", 4 << 30),
            ("4g", 4 << 30),
            ("512MB", 512 << 20),
            ("512mb", 512 << 20),
            ("512 M", 512 << 20),
            ("64KB", 64 << 10),
            ("64K", 64 << 10),
            ("64kib", 64 << 10),
            ("2TB", 2 << 40),
            ("1.5GB", 3 << 29),
            ("1.5 GiB", 3 << 29),
            (".5K", 512),
            ("2.K", 2048),
            ("  16MB\t", 16 << 20),
            ("1.5", 1),
            ("0.3KB", 307),
            ("0.999999999999999999999999999999K", 1023),
            ("0.0009765625K", 1),
            ("18446744073709551615", u64::MAX),
            ("16777215.99999999999999999999TB", u64::MAX),
        ] {
            assert_eq!(parse_size(text), Ok(bytes), "{text:?}");
        }
    }

    #[test]
    fn errors_say_what_is_wrong() {
        assert_eq!(parse_size(""), Err(SizeError::Empty));
        assert_eq!(parse_size("   "), Err(SizeError::Empty));
        assert!(matches!(parse_size("-1"), Err(SizeError::Negative(_))));
        assert!(matches!(parse_size("-4GB"), Err(SizeError::Negative(_))));
        for bad in ["GB", ".", ".MB", "1.2.3", "+5", "1e9", "0x10", "4 4GB"] {
            assert!(
                matches!(
                    parse_size(bad),
                    Err(SizeError::NotANumber(_)) | Err(SizeError::UnknownUnit { .. })
                ),
                "{bad:?}: {:?}",
                parse_size(bad)
            );
        }
        assert!(matches!(parse_size("GB"), Err(SizeError::NotANumber(_))));
        assert_eq!(
            parse_size("12 parsecs"),
            Err(SizeError::UnknownUnit {
                text: "12 parsecs".into(),
                unit: "parsecs".into()
            })
        );
        assert!(matches!(
            parse_size("50%"),
            Err(SizeError::UnknownUnit { .. })
        ));
        assert!(matches!(
            parse_size("4PB"),
            Err(SizeError::UnknownUnit { .. })
        ));
        assert!(matches!(
            parse_size("infinite"),
            Err(SizeError::NotANumber(_))
        ));
        for big in [
            "18446744073709551616",
            "99999999999TB",
            "16777216TB",
            "99999999999999999999999",
        ] {
            assert_eq!(
                parse_size(big),
                Err(SizeError::Overflow(big.into())),
                "{big:?}"
            );
        }
        let msg = parse_size("12 parsecs").unwrap_err().to_string();
        assert!(
            msg.contains("\"12 parsecs\"") && msg.contains("unit"),
            "{msg}"
        );
    }

    #[test]
    fn formats_in_the_largest_exact_unit() {
        assert_eq!(format_size(0), "0");
        assert_eq!(format_size(4097), "4097");
        assert_eq!(format_size(1536 << 10), "1536KB");
        assert_eq!(format_size(16 << 20), "16MB");
        assert_eq!(format_size(4 << 30), "4GB");
        assert_eq!(format_size(3 << 40), "3TB");
    }

    fn unit_spelling() -> impl Strategy<Value = (String, u64)> {
        prop::sample::select(UNITS.to_vec()).prop_flat_map(|(name, scale)| {
            // Any mix of cases, with or without a space before the unit.
            (
                prop::collection::vec(any::<bool>(), name.len()),
                any::<bool>(),
            )
                .prop_map(move |(upper, space)| {
                    let cased: String = name
                        .chars()
                        .zip(upper)
                        .map(|(c, u)| if u { c.to_ascii_uppercase() } else { c })
                        .collect();
                    let sep = if space && !name.is_empty() { " " } else { "" };
                    (format!("{sep}{cased}"), scale)
                })
        })
    }

    proptest! {
        #[test]
        fn formatted_sizes_round_trip(bytes in any::<u64>()) {
            prop_assert_eq!(parse_size(&format_size(bytes)), Ok(bytes));
        }

        #[test]
        fn number_and_unit_multiply(n in 0u64..(1 << 23), (unit, scale) in unit_spelling()) {
            prop_assert_eq!(parse_size(&format!("{n}{unit}")), Ok(n * scale));
        }

        #[test]
        fn fractions_truncate(n in 0u64..1_000_000, frac in 0u32..1000, (unit, scale) in unit_spelling()) {
            let exact = (u128::from(n) * 1000 + u128::from(frac)) * u128::from(scale) / 1000;
            let text = format!("{n}.{frac:03}{unit}");
            prop_assert_eq!(parse_size(&text), Ok(exact as u64));
        }

        #[test]
        fn never_panics(text in "\\PC{0,24}") {
            let _ = parse_size(&text);
        }
    }
}
