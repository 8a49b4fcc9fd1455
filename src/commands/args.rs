//! Value parsers shared by the subcommands' flags: a zero, negative, NaN or out-of-range
//! number is refused by clap with the flag's name, before any work starts.

/// An integer of at least 1 (batch sizes, step counts).
pub fn at_least_one(s: &str) -> Result<usize, String> {
    let v: usize = s.trim().parse().map_err(|_| format!("`{s}` is not a whole number"))?;
    if v == 0 {
        return Err("must be at least 1".into());
    }
    Ok(v)
}

/// A finite number in [0, 1] (thresholds, probabilities).
pub fn unit_interval(s: &str) -> Result<f64, String> {
    let v = finite(s)?;
    if !(0.0..=1.0).contains(&v) {
        return Err(format!("{v} is not in [0, 1]"));
    }
    Ok(v)
}

/// A finite number in [0, 1] as f32.
pub fn unit_interval_f32(s: &str) -> Result<f32, String> {
    unit_interval(s).map(|v| v as f32)
}

/// A finite number above 0.
pub fn positive(s: &str) -> Result<f64, String> {
    let v = finite(s)?;
    if v <= 0.0 {
        return Err(format!("{v} must be above 0"));
    }
    Ok(v)
}

/// A finite number of at least 0.
pub fn non_negative(s: &str) -> Result<f64, String> {
    let v = finite(s)?;
    if v < 0.0 {
        return Err(format!("{v} must be at least 0"));
    }
    Ok(v)
}

/// Any finite number (NaN and infinities refused).
pub fn finite(s: &str) -> Result<f64, String> {
    let v: f64 = s.trim().parse().map_err(|_| format!("`{s}` is not a number"))?;
    if !v.is_finite() {
        return Err(format!("`{s}` is not a finite number"));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_numbers_are_refused() {
        assert!(at_least_one("0").is_err() && at_least_one("-1").is_err() && at_least_one("x").is_err());
        assert_eq!(at_least_one("3"), Ok(3));
        for bad in ["nan", "inf", "-inf", "1.5", "-0.1"] {
            assert!(unit_interval(bad).is_err(), "{bad}");
        }
        assert_eq!(unit_interval("0.5"), Ok(0.5));
        assert!(positive("0").is_err() && positive("NaN").is_err() && positive("2").is_ok());
        assert!(non_negative("-1e-9").is_err() && non_negative("0").is_ok());
    }
}
