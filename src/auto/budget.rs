//! `--memory-budget`: a byte count written as plain bytes or with a binary unit.

/// Binary units accepted after the number, with their factor.
const UNITS: [(&str, u64); 5] = [
    ("B", 1),
    ("KiB", 1 << 10),
    ("MiB", 1 << 20),
    ("GiB", 1 << 30),
    ("TiB", 1 << 40),
];

/// Parses `16GiB`, `1.5 GiB`, `512MiB` or `4096` into bytes (rounded down to a whole byte).
pub fn parse_budget(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = (&t[..split], t[split..].trim());
    let bad = |why: &str| {
        format!("`{text}` is not a memory size ({why}); write bytes or a number with KiB, MiB, GiB or TiB, e.g. 16GiB")
    };
    if number.is_empty() {
        return Err(bad("no number"));
    }
    let factor = match unit {
        "" => 1,
        u => UNITS
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(u))
            .map(|&(_, f)| f)
            .ok_or_else(|| bad(&format!("unknown unit `{u}`")))?,
    };
    let value: f64 = number.parse().map_err(|_| bad("not a number"))?;
    let bytes = value * factor as f64;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(bad("too large"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::parse_budget;

    #[test]
    fn units_and_plain_bytes() {
        assert_eq!(parse_budget("16GiB"), Ok(16 << 30));
        assert_eq!(parse_budget("1.5 MiB"), Ok(3 << 19));
        assert_eq!(parse_budget("4096"), Ok(4096));
        assert_eq!(parse_budget("2kib"), Ok(2048));
        assert_eq!(parse_budget("7B"), Ok(7));
        assert_eq!(parse_budget("0"), Ok(0));
    }

    #[test]
    fn rejects_what_is_not_a_size() {
        for bad in [
            "",
            "GiB",
            "-1GiB",
            "16GB",
            "1e3",
            "1.2.3MiB",
            "16 XiB",
            "99999999999TiB",
        ] {
            assert!(parse_budget(bad).is_err(), "{bad}");
        }
    }
}
