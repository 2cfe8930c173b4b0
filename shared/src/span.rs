//! Spans of time as people write them in settings, commands and templates: a whole
//! number and a unit, such as `90s`, `15m`, `12h`, `30d` or `2w`. Each caller says which
//! units it takes, checks its own bounds and words its own errors.

use chrono::TimeDelta;

/// Why a text is not a span.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpanError {
    /// Only digits (or nothing): no unit.
    NoUnit,
    /// The unit is there, the whole number before it is not.
    NotANumber,
    /// What follows the number is not one of the units the caller takes.
    UnknownUnit(String),
    /// Too long to represent.
    TooLong,
}

/// Parse `text` (not trimmed) as a whole number followed by one of `units`, each of `s`,
/// `m`, `h`, `d` or `w`.
///
/// # Errors
///
/// See [`SpanError`].
pub fn parse_span(text: &str, units: &[&str]) -> Result<TimeDelta, SpanError> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or(SpanError::NoUnit)?;
    let (number, unit) = text.split_at(split);
    let number: i64 = number.parse().map_err(|_| SpanError::NotANumber)?;
    if !units.contains(&unit) {
        return Err(SpanError::UnknownUnit(unit.to_owned()));
    }
    match unit {
        "s" => TimeDelta::try_seconds(number),
        "m" => TimeDelta::try_minutes(number),
        "h" => TimeDelta::try_hours(number),
        "d" => TimeDelta::try_days(number),
        "w" => TimeDelta::try_weeks(number),
        _ => return Err(SpanError::UnknownUnit(unit.to_owned())),
    }
    .ok_or(SpanError::TooLong)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: &[&str] = &["s", "m", "h", "d", "w"];

    #[test]
    fn a_span_is_a_whole_number_and_one_of_the_units_asked_for() {
        assert_eq!(parse_span("90s", ALL), Ok(TimeDelta::seconds(90)));
        assert_eq!(parse_span("2w", ALL), Ok(TimeDelta::weeks(2)));
        assert_eq!(parse_span("0m", ALL), Ok(TimeDelta::zero()));
        assert_eq!(parse_span("30", ALL), Err(SpanError::NoUnit));
        assert_eq!(parse_span("", ALL), Err(SpanError::NoUnit));
        assert_eq!(parse_span("h", ALL), Err(SpanError::NotANumber));
        assert_eq!(parse_span("-1h", ALL), Err(SpanError::NotANumber));
        assert_eq!(
            parse_span("1d", &["s", "m", "h"]),
            Err(SpanError::UnknownUnit("d".into()))
        );
        assert_eq!(
            parse_span("1.5s", ALL),
            Err(SpanError::UnknownUnit(".5s".into()))
        );
        assert_eq!(
            parse_span("1 s", ALL),
            Err(SpanError::UnknownUnit(" s".into()))
        );
        assert_eq!(
            parse_span("99999999999999999w", ALL),
            Err(SpanError::TooLong)
        );
        assert_eq!(
            parse_span("999999999999999999999s", ALL),
            Err(SpanError::NotANumber)
        );
    }
}
