//! Byte sizes and percentages as people write them: `"50 MiB"`, `"1.5GB"`, `"64 KiB"`, `"10%"`.
//!
//! One parser for the pytest marker, `[tool.memgauge]`, the baseline and the CLI, so a size means
//! the same thing everywhere.

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SizeError {
    #[error("empty size: write a number with an optional unit, e.g. \"50 MiB\"")]
    Empty,
    #[error("{0:?} is not a size: write a number with an optional unit, e.g. \"50 MiB\"")]
    NotANumber(String),
    #[error("{0:?} is negative: a size is at least 0")]
    Negative(String),
    #[error(
        "{value:?} has an unknown unit {unit:?}: use B, KB, MB, GB, TB (powers of 1000) or \
         KiB, MiB, GiB, TiB (powers of 1024)"
    )]
    UnknownUnit { value: String, unit: String },
    #[error("{0:?} is a fraction of a byte: give a unit (\"1.5 MiB\") or a whole number of bytes")]
    FractionalBytes(String),
    #[error("{0:?} is too large")]
    TooLarge(String),
    #[error("{0:?} is not a percentage: write e.g. \"10%\" or \"2.5%\"")]
    NotAPercentage(String),
}

fn unit_multiplier(unit: &str) -> Option<u64> {
    const KIB: u64 = 1024;
    let multiplier = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1000,
        "mb" => 1000 * 1000,
        "gb" => 1000 * 1000 * 1000,
        "tb" => 1000 * 1000 * 1000 * 1000,
        "kib" => KIB,
        "mib" => KIB * KIB,
        "gib" => KIB * KIB * KIB,
        "tib" => KIB * KIB * KIB * KIB,
        _ => return None,
    };
    Some(multiplier)
}

/// Splits `" 1.5 MiB "` into `("1.5", "MiB")`.
fn split_number(text: &str) -> (&str, &str) {
    let end = text
        .char_indices()
        .find(|&(_, c)| !(c.is_ascii_digit() || c == '.' || c == '-' || c == '+' || c == '_'))
        .map_or(text.len(), |(i, _)| i);
    (&text[..end], text[end..].trim())
}

/// Parses a size in bytes. A bare integer is bytes; decimals need a unit.
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(SizeError::Empty);
    }
    let (number, unit) = split_number(trimmed);
    let number = number.replace('_', "");
    if number.starts_with('-') {
        return Err(SizeError::Negative(text.to_owned()));
    }
    let multiplier = unit_multiplier(unit).ok_or_else(|| SizeError::UnknownUnit {
        value: text.to_owned(),
        unit: unit.to_owned(),
    })?;
    if !number.contains('.') {
        let whole: u64 = number
            .trim_start_matches('+')
            .parse()
            .map_err(|_| SizeError::NotANumber(text.to_owned()))?;
        return whole
            .checked_mul(multiplier)
            .ok_or_else(|| SizeError::TooLarge(text.to_owned()));
    }
    let value: f64 = number
        .parse()
        .map_err(|_| SizeError::NotANumber(text.to_owned()))?;
    if !value.is_finite() {
        return Err(SizeError::NotANumber(text.to_owned()));
    }
    if multiplier == 1 && value.fract() != 0.0 {
        return Err(SizeError::FractionalBytes(text.to_owned()));
    }
    let bytes = (value * multiplier as f64).round();
    if bytes >= u64::MAX as f64 {
        return Err(SizeError::TooLarge(text.to_owned()));
    }
    Ok(bytes as u64)
}

/// Parses `"10%"` (or `"10"`) into the fraction 0.10.
pub fn parse_percent(text: &str) -> Result<f64, SizeError> {
    let trimmed = text.trim();
    let number = trimmed.strip_suffix('%').unwrap_or(trimmed).trim();
    let value: f64 = number
        .parse()
        .map_err(|_| SizeError::NotAPercentage(text.to_owned()))?;
    if !value.is_finite() {
        return Err(SizeError::NotAPercentage(text.to_owned()));
    }
    if value < 0.0 {
        return Err(SizeError::Negative(text.to_owned()));
    }
    Ok(value / 100.0)
}

/// Formats bytes in binary units, as memory tools print them: `"12.34 MiB"`.
pub fn format_size(bytes: u64) -> String {
    format_signed_size(bytes as i128)
}

/// Like [`format_size`], keeping the sign of a change: `"-68.66 MiB"`.
pub fn format_signed_size(bytes: i128) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let magnitude = bytes.unsigned_abs();
    let sign = if bytes < 0 { "-" } else { "" };
    if magnitude < 1024 {
        return format!("{sign}{magnitude} B");
    }
    let mut value = magnitude as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{sign}{value:.2} {}", UNITS[unit])
}

/// `value` in decimal, without the formatting machinery.
pub fn push_number(out: &mut String, mut value: u64) {
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    out.push_str(std::str::from_utf8(&digits[start..]).expect("ASCII digits"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_case_insensitively() {
        assert_eq!(parse_size("50 MiB"), Ok(50 * 1024 * 1024));
        assert_eq!(parse_size("50mib"), Ok(50 * 1024 * 1024));
        assert_eq!(parse_size("1.5 KiB"), Ok(1536));
        assert_eq!(parse_size("2GB"), Ok(2_000_000_000));
        assert_eq!(parse_size("64 kb"), Ok(64_000));
        assert_eq!(parse_size("1024"), Ok(1024));
        assert_eq!(parse_size(" 7 B "), Ok(7));
        assert_eq!(parse_size("10_000_000"), Ok(10_000_000));
        assert_eq!(parse_size("0.5 GiB"), Ok(512 * 1024 * 1024));
    }

    #[test]
    fn rejects_bad_sizes_with_the_reason() {
        assert_eq!(parse_size(""), Err(SizeError::Empty));
        assert!(matches!(
            parse_size("50 XB"),
            Err(SizeError::UnknownUnit { unit, .. }) if unit == "XB"
        ));
        assert!(matches!(parse_size("-5 MiB"), Err(SizeError::Negative(_))));
        assert!(matches!(
            parse_size("1.5"),
            Err(SizeError::FractionalBytes(_))
        ));
        assert!(matches!(parse_size("MiB"), Err(SizeError::NotANumber(_))));
        assert!(matches!(
            parse_size("1.2.3 MiB"),
            Err(SizeError::NotANumber(_))
        ));
        assert!(matches!(
            parse_size("99999999999 TiB"),
            Err(SizeError::TooLarge(_))
        ));
    }

    #[test]
    fn percentages() {
        assert_eq!(parse_percent("10%"), Ok(0.10));
        assert_eq!(parse_percent("2.5 %"), Ok(0.025));
        assert_eq!(parse_percent("0"), Ok(0.0));
        assert!(parse_percent("ten%").is_err());
        assert!(parse_percent("-1%").is_err());
    }

    #[test]
    fn formats_binary_units() {
        assert_eq!(format_size(0), "0 B");
        assert_eq!(format_size(1023), "1023 B");
        assert_eq!(format_size(1536), "1.50 KiB");
        assert_eq!(format_size(100 * 1024 * 1024), "100.00 MiB");
        assert_eq!(format_signed_size(-72_000_056), "-68.66 MiB");
    }

    proptest::proptest! {
        #[test]
        fn never_panics(text in "\\PC{0,24}") {
            let _ = parse_size(&text);
            let _ = parse_percent(&text);
        }

        #[test]
        fn whole_bytes_round_trip(bytes in 0u64..u64::MAX / 2) {
            proptest::prop_assert_eq!(parse_size(&bytes.to_string()), Ok(bytes));
            proptest::prop_assert_eq!(parse_size(&format!("{bytes} B")), Ok(bytes));
        }
    }
}
