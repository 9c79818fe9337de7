//! Freeze windows: when a service's changes are refused (its business hours, a holiday freeze).
//! Rollbacks are never frozen.
//!
//! Written as people say them, in UTC:
//! - weekly: `Sat 00:00-06:00 UTC`, `Mon-Fri 09:00-17:00 UTC`, `Sat,Sun 00:00-24:00 UTC`,
//!   `daily 22:00-02:00 UTC` (an end at or before the start runs past midnight);
//! - once: `2026-12-24 00:00 - 2027-01-02 00:00 UTC`.
//!
//! Kept parsed in the replicated state, so whether a moment is frozen never depends on how a
//! later release reads the text.

use serde::{Deserialize, Serialize};

/// Longest window as written.
pub const MAX_WINDOW_BYTES: usize = 64;
/// Most windows one service keeps.
pub const MAX_WINDOWS: usize = 16;

const MINUTES_PER_DAY: u64 = 24 * 60;
const MINUTES_PER_WEEK: u64 = 7 * MINUTES_PER_DAY;
const DAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FreezeWindow {
    /// As written (normalised spacing), for people.
    pub text: String,
    pub when: Recurrence,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Recurrence {
    /// Starting on each of `days` (0 = Monday) at `start_minute` of the day (UTC), for
    /// `minutes`.
    Weekly {
        days: Vec<u8>,
        start_minute: u32,
        minutes: u32,
    },
    /// From `start_ms` until `end_ms`.
    Once { start_ms: u64, end_ms: u64 },
}

impl FreezeWindow {
    /// Parses a window as written; the error says what is wrong and how to write it.
    pub fn parse(text: &str) -> Result<Self, String> {
        let words: Vec<&str> = text.split_whitespace().collect();
        let text = words.join(" ");
        if text.len() > MAX_WINDOW_BYTES {
            return Err(format!(
                "{:?} is longer than {MAX_WINDOW_BYTES} bytes",
                crate::names::truncate(&text, MAX_WINDOW_BYTES)
            ));
        }
        let usage = "write `Sat 00:00-06:00 UTC`, `Mon-Fri 09:00-17:00 UTC` or \
                     `2026-12-24 00:00 - 2027-01-02 00:00 UTC`";
        let Some((&zone, words)) = words.split_last() else {
            return Err(format!("a freeze window is empty: {usage}"));
        };
        if zone != "UTC" {
            return Err(format!(
                "{text:?} must end in UTC (other time zones are not supported: convert the times)"
            ));
        }
        let when = match words {
            [days, hours] => {
                let days = parse_days(days).map_err(|why| format!("{text:?}: {why}; {usage}"))?;
                let (start, end) = hours
                    .split_once('-')
                    .ok_or_else(|| format!("{text:?}: {hours:?} must be HH:MM-HH:MM; {usage}"))?;
                let start = parse_minute(start, false).map_err(|why| format!("{text:?}: {why}"))?;
                let end = parse_minute(end, true).map_err(|why| format!("{text:?}: {why}"))?;
                let minutes = if end > start {
                    end - start
                } else {
                    end + MINUTES_PER_DAY as u32 - start
                };
                Recurrence::Weekly {
                    days,
                    start_minute: start,
                    minutes,
                }
            }
            [start_day, start_time, "-", end_day, end_time] => {
                let start_ms = parse_moment(start_day, start_time)
                    .map_err(|why| format!("{text:?}: {why}"))?;
                let end_ms =
                    parse_moment(end_day, end_time).map_err(|why| format!("{text:?}: {why}"))?;
                if end_ms <= start_ms {
                    return Err(format!("{text:?}: it ends before it starts"));
                }
                Recurrence::Once { start_ms, end_ms }
            }
            _ => return Err(format!("{text:?} is not a freeze window: {usage}")),
        };
        Ok(Self { text, when })
    }

    /// When the window that holds `at_ms` ends, if one does.
    pub fn frozen_until(&self, at_ms: u64) -> Option<u64> {
        match &self.when {
            Recurrence::Once { start_ms, end_ms } => {
                (*start_ms <= at_ms && at_ms < *end_ms).then_some(*end_ms)
            }
            Recurrence::Weekly {
                days,
                start_minute,
                minutes,
            } => {
                // 1970-01-01 was a Thursday: minutes into the week (from Monday 00:00 UTC).
                let minute = at_ms / 60_000;
                let into_week = (minute + 3 * MINUTES_PER_DAY) % MINUTES_PER_WEEK;
                days.iter()
                    .filter_map(|&day| {
                        let start = u64::from(day) * MINUTES_PER_DAY + u64::from(*start_minute);
                        let since = (into_week + MINUTES_PER_WEEK - start) % MINUTES_PER_WEEK;
                        if since >= u64::from(*minutes) {
                            return None;
                        }
                        let window_start = minute.checked_sub(since)?;
                        Some((window_start + u64::from(*minutes)) * 60_000)
                    })
                    .max()
            }
        }
    }
}

/// `Sat`, `Mon-Fri`, `Sat,Sun`, `daily`: day numbers from 0 (Monday).
fn parse_days(text: &str) -> Result<Vec<u8>, String> {
    if text.eq_ignore_ascii_case("daily") {
        return Ok((0..7).collect());
    }
    let day = |name: &str| {
        DAYS.iter()
            .position(|day| day.eq_ignore_ascii_case(name))
            .map(|day| day as u8)
            .ok_or_else(|| format!("{name:?} is not a day (Mon, Tue, ... Sun, or daily)"))
    };
    let mut days = Vec::new();
    for part in text.split(',') {
        match part.split_once('-') {
            Some((first, last)) => {
                let (first, last) = (day(first)?, day(last)?);
                if last < first {
                    return Err(format!("{part:?} runs backwards (write Mon-Fri)"));
                }
                days.extend(first..=last);
            }
            None => days.push(day(part)?),
        }
    }
    days.sort_unstable();
    days.dedup();
    Ok(days)
}

/// `HH:MM` as minutes of the day; `24:00` only as an end.
fn parse_minute(text: &str, end: bool) -> Result<u32, String> {
    let bad = || format!("{text:?} is not a time of day (HH:MM)");
    let (hours, minutes) = text.split_once(':').ok_or_else(bad)?;
    if hours.len() != 2 || minutes.len() != 2 {
        return Err(bad());
    }
    let hours: u32 = hours.parse().map_err(|_| bad())?;
    let minutes: u32 = minutes.parse().map_err(|_| bad())?;
    match (hours, minutes) {
        (24, 0) if end => Ok(24 * 60),
        (0..=23, 0..=59) => Ok(hours * 60 + minutes),
        _ => Err(bad()),
    }
}

/// `YYYY-MM-DD` and `HH:MM` (UTC) as ms since the epoch.
fn parse_moment(day: &str, time_of_day: &str) -> Result<u64, String> {
    let format = time::macros::format_description!("[year]-[month]-[day]");
    let date = time::Date::parse(day, &format)
        .map_err(|_| format!("{day:?} is not a date (YYYY-MM-DD)"))?;
    let minute = parse_minute(time_of_day, false)?;
    let midnight = date.midnight().assume_utc().unix_timestamp();
    let seconds = u64::try_from(midnight).map_err(|_| format!("{day:?} is before 1970"))?
        + u64::from(minute) * 60;
    Ok(seconds * 1000)
}

/// A freeze whose windows leave no gap as far as they are followed: it has no end.
pub const NO_END: u64 = u64::MAX;

/// When the freeze holding `at_ms` ends, following windows that meet or overlap (`Sat,Sun
/// 00:00-24:00 UTC` on a Saturday holds until Monday), and the window that held `at_ms`;
/// [`NO_END`] when they leave no gap for weeks (`daily 00:00-24:00 UTC`).
pub fn frozen_until(windows: &[FreezeWindow], at_ms: u64) -> Option<(&str, u64)> {
    let holding = |at_ms: u64| {
        windows
            .iter()
            .filter_map(|window| Some((window.text.as_str(), window.frozen_until(at_ms)?)))
            .max_by_key(|&(_, until)| until)
    };
    let (text, mut until) = holding(at_ms)?;
    // Bounded: every window recurs weekly, so a freeze still unbroken after as many steps as
    // there can be windows in a week never breaks.
    for _ in 0..MAX_WINDOWS * 7 {
        match holding(until) {
            Some((_, later)) if later > until => until = later,
            _ => return Some((text, until)),
        }
    }
    Some((text, NO_END))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-12-05 was a Saturday.
    fn at(day: &str, hh_mm: &str) -> u64 {
        parse_moment(day, hh_mm).unwrap()
    }

    #[test]
    fn a_weekly_window_holds_its_hours_on_its_days_only() {
        let window = FreezeWindow::parse("Sat   00:00-06:00 UTC").unwrap();
        assert_eq!(window.text, "Sat 00:00-06:00 UTC");
        assert_eq!(
            window.frozen_until(at("2026-12-05", "03:00")),
            Some(at("2026-12-05", "06:00"))
        );
        assert_eq!(window.frozen_until(at("2026-12-05", "06:00")), None);
        assert_eq!(window.frozen_until(at("2026-12-04", "03:00")), None);
        assert_eq!(
            window.frozen_until(at("2026-12-12", "00:00")),
            Some(at("2026-12-12", "06:00"))
        );
    }

    #[test]
    fn a_window_past_midnight_and_day_ranges() {
        let night = FreezeWindow::parse("Fri 22:00-02:00 UTC").unwrap();
        assert_eq!(
            night.frozen_until(at("2026-12-05", "01:59")),
            Some(at("2026-12-05", "02:00"))
        );
        assert_eq!(night.frozen_until(at("2026-12-04", "21:59")), None);
        let office = FreezeWindow::parse("Mon-Fri 09:00-17:00 UTC").unwrap();
        assert!(office.frozen_until(at("2026-12-07", "09:00")).is_some());
        assert!(office.frozen_until(at("2026-12-05", "10:00")).is_none());
        let weekend = FreezeWindow::parse("Sat,Sun 00:00-24:00 UTC").unwrap();
        assert_eq!(
            weekend.frozen_until(at("2026-12-06", "12:00")),
            Some(at("2026-12-07", "00:00"))
        );
        // Saturday's and Sunday's windows meet, and Monday's follows: on Saturday, frozen until
        // Monday's ends.
        let windows = [weekend, FreezeWindow::parse("Mon 00:00-01:00 UTC").unwrap()];
        assert_eq!(
            frozen_until(&windows, at("2026-12-05", "12:00")),
            Some(("Sat,Sun 00:00-24:00 UTC", at("2026-12-07", "01:00")))
        );
        let always = [FreezeWindow::parse("daily 00:00-24:00 UTC").unwrap()];
        assert_eq!(
            frozen_until(&always, at("2026-12-05", "12:00")),
            Some(("daily 00:00-24:00 UTC", NO_END))
        );
        // Near the epoch, a window that began before it holds nothing rather than underflowing.
        let night = FreezeWindow::parse("Wed 22:00-02:00 UTC").unwrap();
        assert_eq!(night.frozen_until(60_000), None);
        let daily = FreezeWindow::parse("daily 12:00-13:00 UTC").unwrap();
        assert!(daily.frozen_until(at("2026-12-09", "12:30")).is_some());
    }

    #[test]
    fn a_one_off_window() {
        let holidays = FreezeWindow::parse("2026-12-24 00:00 - 2027-01-02 00:00 UTC").unwrap();
        assert_eq!(
            holidays.frozen_until(at("2026-12-31", "23:00")),
            Some(at("2027-01-02", "00:00"))
        );
        assert_eq!(holidays.frozen_until(at("2027-01-02", "00:00")), None);
    }

    #[test]
    fn bad_windows_say_what_is_wrong() {
        for (text, expected) in [
            ("Sat 00:00-06:00 CET", "must end in UTC"),
            ("Caturday 00:00-06:00 UTC", "is not a day"),
            ("Fri-Mon 00:00-06:00 UTC", "runs backwards"),
            ("Sat 25:00-06:00 UTC", "is not a time of day"),
            ("Sat 00:00 UTC", "must be HH:MM-HH:MM"),
            (
                "2026-12-24 00:00 - 2026-12-23 00:00 UTC",
                "ends before it starts",
            ),
            ("2026-13-24 00:00 - 2027-01-02 00:00 UTC", "is not a date"),
            ("UTC", "is not a freeze window"),
            ("", "is empty"),
        ] {
            let error = FreezeWindow::parse(text).unwrap_err();
            assert!(error.contains(expected), "{text}: {error}");
        }
        let long = format!("Sat 00:00-06:00 {} UTC", "x".repeat(80));
        assert!(
            FreezeWindow::parse(&long)
                .unwrap_err()
                .contains("longer than")
        );
    }
}
