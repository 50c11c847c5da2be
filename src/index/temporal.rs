//! DA, TM and DT values normalised for storage and range matching (PS3.4 C.2.2.2.5).
//!
//! Normalised forms compare as strings: dates `YYYYMMDD`, times `HHMMSS.FFFFFF`, date-times
//! `YYYYMMDDHHMMSS.FFFFFF` in UTC when an offset is known (the value's own `&ZZXX`, else the Timezone
//! Offset From UTC of the object or the query), as written otherwise. A partial value names a span: its
//! lower bound is stored and matched from, its upper bound matched to.

// Calendar arithmetic (an offset can move a value across a day, month or year): dicom-core's chrono.
use dicom_core::chrono::{NaiveDate, TimeDelta};

use super::query::Matcher;

/// Normalises a DA value (`YYYYMMDD`, or the old `YYYY.MM.DD`) for storage and comparison.
pub fn normalize_date(v: &str) -> Option<String> {
    let d: String = v.trim().chars().filter(|&c| c != '.').collect();
    let valid = d.len() == 8
        && d.bytes().all(|b| b.is_ascii_digit())
        && (1..=12).contains(&d[4..6].parse::<u8>().ok()?)
        && (1..=31).contains(&d[6..8].parse::<u8>().ok()?);
    valid.then_some(d)
}

pub fn date_matcher(value: &str) -> Option<Matcher> {
    match value.split_once('-') {
        None => Some(Matcher::Single(normalize_date(value)?)),
        Some((lo, hi)) => range(optional(lo, normalize_date)?, optional(hi, normalize_date)?),
    }
}

/// Normalises a TM value to `HHMMSS.FFFFFF`; missing parts are filled with the lowest values, or
/// for an upper bound the highest, so that `-12` includes 12:59:59.
fn normalize_time_with(v: &str, upper: bool) -> Option<String> {
    let t: String = v.trim().chars().filter(|&c| c != ':').collect();
    let (whole, frac) = match t.split_once('.') {
        Some((w, f)) => (w, f),
        None => (t.as_str(), ""),
    };
    let ok = matches!(whole.len(), 2 | 4 | 6)
        && whole.bytes().all(|b| b.is_ascii_digit())
        && frac.len() <= 6
        && frac.bytes().all(|b| b.is_ascii_digit())
        && (frac.is_empty() || whole.len() == 6);
    if !ok {
        return None;
    }
    let limits = [23u8, 59, 60];
    for (i, chunk) in whole.as_bytes().chunks(2).enumerate() {
        let n: u8 = std::str::from_utf8(chunk).ok()?.parse().ok()?;
        if n > limits[i] {
            return None;
        }
    }
    let pad_whole = if upper { "235959" } else { "000000" };
    let pad_frac = if upper { '9' } else { '0' };
    let mut out = String::with_capacity(13);
    out.push_str(whole);
    out.push_str(&pad_whole[whole.len()..]);
    out.push('.');
    out.push_str(frac);
    out.extend(std::iter::repeat_n(pad_frac, 6 - frac.len()));
    Some(out)
}

pub fn normalize_time(v: &str) -> Option<String> {
    normalize_time_with(v, false)
}

pub fn time_matcher(value: &str) -> Option<Matcher> {
    match value.split_once('-') {
        // A single partial time matches the whole span it names (e.g. "10" = 10:00-10:59).
        None => span(
            normalize_time_with(value, false)?,
            normalize_time_with(value, true)?,
        ),
        Some((lo, hi)) => range(
            optional(lo, |v| normalize_time_with(v, false))?,
            optional(hi, |v| normalize_time_with(v, true))?,
        ),
    }
}

/// A UTC offset `&ZZXX` (Timezone Offset From UTC, or the tail of a DT value) in minutes.
pub fn parse_offset(v: &str) -> Option<i32> {
    let v = v.trim();
    let (sign, digits) = match v.as_bytes().first()? {
        b'+' => (1, &v[1..]),
        b'-' => (-1, &v[1..]),
        _ => return None,
    };
    if digits.len() != 4 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (hours, minutes): (i32, i32) = (digits[..2].parse().ok()?, digits[2..].parse().ok()?);
    let valid = minutes <= 59 && if sign < 0 { hours <= 12 } else { hours <= 14 };
    valid.then_some(sign * (hours * 60 + minutes))
}

/// The first (or, for `upper`, the last) moment of the span a DT value names, normalised.
/// `default_offset` applies when the value carries no offset of its own.
fn datetime_bound(v: &str, default_offset: Option<i32>, upper: bool) -> Option<String> {
    let v = v.trim();
    let (moment, offset) = match v.find(['+', '-']) {
        Some(i) => (&v[..i], Some(parse_offset(&v[i..])?)),
        None => (v, default_offset),
    };
    let (whole, frac) = moment.split_once('.').unwrap_or((moment, ""));
    let ok = matches!(whole.len(), 4 | 6 | 8 | 10 | 12 | 14)
        && whole.bytes().all(|b| b.is_ascii_digit())
        && frac.len() <= 6
        && frac.bytes().all(|b| b.is_ascii_digit())
        && (frac.is_empty() || whole.len() == 14);
    if !ok {
        return None;
    }
    let part = |at: usize, low: u32, high: u32| -> u32 {
        match whole.get(at..at + 2) {
            Some(digits) => digits.parse().expect("checked digits"),
            None if upper => high,
            None => low,
        }
    };
    let year: i32 = whole[..4].parse().ok()?;
    let month = part(4, 1, 12);
    let last_day = (28..=31)
        .rev()
        .find(|&d| NaiveDate::from_ymd_opt(year, month, d).is_some())?;
    let date = NaiveDate::from_ymd_opt(year, month, part(6, 1, last_day))?;
    let mut second = part(12, 0, 59);
    let mut micros = if frac.is_empty() && upper { 999_999 } else { 0 };
    if !frac.is_empty() {
        let pad = if upper { '9' } else { '0' };
        let digits: String = frac.chars().chain(std::iter::repeat(pad)).take(6).collect();
        micros = digits.parse().expect("checked digits");
    }
    if second == 60 {
        // A leap second sorts with the last microsecond of its minute.
        (second, micros) = (59, 999_999);
    }
    let moment = date.and_hms_micro_opt(part(8, 0, 23), part(10, 0, 59), second, micros)?;
    let utc = moment.checked_sub_signed(TimeDelta::minutes(offset.unwrap_or(0).into()))?;
    Some(utc.format("%Y%m%d%H%M%S%.6f").to_string())
}

/// Normalises a stored DT value (its first moment); `default_offset` is the object's Timezone
/// Offset From UTC.
pub fn normalize_datetime(v: &str, default_offset: Option<i32>) -> Option<String> {
    datetime_bound(v, default_offset, false)
}

/// A DT matching value: a single (possibly partial) value matches the span it names; a range splits
/// at the `-` that leaves a valid DT (or nothing) on both sides, since offsets may contain `-` too.
pub fn datetime_matcher(value: &str, default_offset: Option<i32>) -> Option<Matcher> {
    let lower = |v: &str| datetime_bound(v, default_offset, false);
    let upper = |v: &str| datetime_bound(v, default_offset, true);
    if let (Some(lo), Some(hi)) = (lower(value), upper(value)) {
        return span(lo, hi);
    }
    value.match_indices('-').find_map(|(i, _)| {
        range(
            optional(&value[..i], lower)?,
            optional(&value[i + 1..], upper)?,
        )
    })
}

/// `Some(None)` for an empty (open) range end, `Some(Some(v))` for a valid one, `None` if invalid.
fn optional(v: &str, normalize: impl Fn(&str) -> Option<String>) -> Option<Option<String>> {
    if v.trim().is_empty() {
        Some(None)
    } else {
        normalize(v).map(Some)
    }
}

/// A range with at least one end.
fn range(lo: Option<String>, hi: Option<String>) -> Option<Matcher> {
    (lo.is_some() || hi.is_some()).then_some(Matcher::Range(lo, hi))
}

/// The span a single value names: one value when it is complete.
fn span(lo: String, hi: String) -> Option<Matcher> {
    Some(if lo == hi {
        Matcher::Single(lo)
    } else {
        Matcher::Range(Some(lo), Some(hi))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(lo: &str, hi: &str) -> Matcher {
        let end = |v: &str| (!v.is_empty()).then(|| v.to_string());
        Matcher::Range(end(lo), end(hi))
    }

    #[test]
    fn time_values_are_normalised_and_partial_times_span() {
        assert_eq!(normalize_time("1015").unwrap(), "101500.000000");
        assert_eq!(normalize_time("10:15:30.5").unwrap(), "101530.500000");
        assert_eq!(
            time_matcher("10"),
            Some(r("100000.000000", "105959.999999"))
        );
        assert!(normalize_time("2500").is_none());
        assert!(normalize_time("1").is_none());
    }

    #[test]
    fn datetimes_are_normalised_to_utc_when_an_offset_is_known() {
        let n = |v, tz| normalize_datetime(v, tz);
        assert_eq!(n("20200115101500", None).unwrap(), "20200115101500.000000");
        assert_eq!(
            n("20200115101500.5", None).unwrap(),
            "20200115101500.500000"
        );
        assert_eq!(n("202001", None).unwrap(), "20200101000000.000000");
        assert_eq!(
            n("20200115003000+0100", None).unwrap(),
            "20200114233000.000000"
        );
        assert_eq!(
            n("20200115233000-0530", None).unwrap(),
            "20200116050000.000000"
        );
        // The object's Timezone Offset From UTC applies only to a value without its own.
        assert_eq!(
            n("20200115101500", Some(60)).unwrap(),
            "20200115091500.000000"
        );
        assert_eq!(
            n("20200115101500+0000", Some(60)).unwrap(),
            "20200115101500.000000"
        );
        for bad in [
            "2020011",
            "20200230",
            "2020011510150",
            "20200115101500+1500",
            "x",
            "",
        ] {
            assert!(n(bad, None).is_none(), "{bad}");
        }
    }

    #[test]
    fn datetime_matching_values_name_spans_and_ranges() {
        let cases = [
            // A partial value spans what it names.
            (
                "2020",
                None,
                "20200101000000.000000",
                "20201231235959.999999",
            ),
            (
                "202002",
                None,
                "20200201000000.000000",
                "20200229235959.999999",
            ),
            (
                "20200115-20200116",
                None,
                "20200115000000.000000",
                "20200116235959.999999",
            ),
            ("-2020", None, "", "20201231235959.999999"),
            ("20200115120000-", None, "20200115120000.000000", ""),
            // Offsets inside a range: the split is where both sides are valid.
            (
                "20200115120000-0500-20200115190000+0100",
                None,
                "20200115170000.000000",
                "20200115180000.999999",
            ),
            // A lone value with a negative offset is one value, not a range.
            (
                "20200115120000-0500",
                None,
                "20200115170000.000000",
                "20200115170000.999999",
            ),
            // The query's Timezone Offset From UTC applies to values without their own.
            (
                "20200115120000-20200115130000",
                Some(120),
                "20200115100000.000000",
                "20200115110000.999999",
            ),
        ];
        for (value, offset, from, to) in cases {
            assert_eq!(
                datetime_matcher(value, offset),
                Some(r(from, to)),
                "{value}"
            );
        }
        assert_eq!(
            datetime_matcher("20200115101500.000000", None),
            Some(Matcher::Single("20200115101500.000000".into()))
        );
        for bad in ["-", "2020-x", "2020.5", "20201301"] {
            assert_eq!(datetime_matcher(bad, None), None, "{bad}");
        }
    }

    #[test]
    fn offsets_are_bounded() {
        assert_eq!(parse_offset("+0100"), Some(60));
        assert_eq!(parse_offset("-0530"), Some(-330));
        assert_eq!(parse_offset("+1400"), Some(840));
        assert_eq!(parse_offset("-1300"), None);
        assert_eq!(parse_offset("0100"), None);
        assert_eq!(parse_offset("+01"), None);
    }
}
