//! When a schedule fires: a cron expression read on a time zone's wall clock.
//!
//! A cron has five fields (minute, hour, day of month, month, day of week) or six (a
//! second first), with the usual lists, ranges, steps and names, and `L`, `W` and `#`.
//! It is matched against the local time of `timezone` (an IANA name), across daylight
//! saving changes as a wall clock would:
//!
//! - a local time that occurs twice (the clocks go back) fires once, at its first
//!   occurrence;
//! - a local time that does not occur (the clocks go forward) fires when it would have,
//!   read with the offset before the change: `30 2 * * *` in Europe/Paris fires at 03:30
//!   on the night the clocks skip from 02:00 to 03:00;
//! - two local times that land on the same instant that way fire once.
//!
//! So `30 2 * * *` fires exactly once every night.

use std::str::FromStr;

use chrono::{DateTime, NaiveDateTime, Offset, TimeDelta, TimeZone, Timelike, Utc};
use chrono_tz::Tz;
use croner::parser::{CronParser, Seconds, Year};

use crate::states::CatchUp;

/// A parsed schedule: a cron on a time zone.
#[derive(Debug, Clone)]
pub struct Schedule {
    cron: croner::Cron,
    timezone: Tz,
}

/// The most fire times [`Schedule::due`] returns.
pub const MAX_DUE: usize = 100;

impl Schedule {
    /// Parse `cron` on `timezone` (an IANA name such as `Europe/Paris`; `UTC`).
    ///
    /// # Errors
    ///
    /// Which of the two is wrong, and why: `("cron", …)` or `("timezone", …)`.
    pub fn parse(cron: &str, timezone: &str) -> Result<Self, Vec<(&'static str, String)>> {
        let mut problems = Vec::new();
        let fields = cron.split_whitespace().count();
        let parsed = if !(5..=6).contains(&fields) && !cron.trim_start().starts_with('@') {
            problems.push((
                "cron",
                format!(
                    "`{cron}` has {fields} fields; a cron has five (minute hour day-of-month month day-of-week) or six (a second first)"
                ),
            ));
            None
        } else {
            match CronParser::builder()
                .seconds(Seconds::Optional)
                .year(Year::Disallowed)
                .build()
                .parse(cron)
            {
                Ok(parsed) => Some(parsed),
                Err(error) => {
                    problems.push((
                        "cron",
                        format!("`{cron}` is not a cron expression: {error}"),
                    ));
                    None
                }
            }
        };
        let timezone = match Tz::from_str(timezone) {
            Ok(timezone) => Some(timezone),
            Err(_) => {
                problems.push((
                    "timezone",
                    format!("`{timezone}` is not an IANA time zone name (such as `Europe/Paris` or `UTC`)"),
                ));
                None
            }
        };
        match (parsed, timezone) {
            (Some(cron), Some(timezone)) if problems.is_empty() => {
                let schedule = Schedule { cron, timezone };
                // A pattern that never matches (`0 0 31 2 *`) is refused too.
                if schedule.next_after(Utc::now()).is_none() {
                    return Err(vec![(
                        "cron",
                        format!("`{}` never fires", schedule.cron.pattern),
                    )]);
                }
                Ok(schedule)
            }
            _ => Err(problems),
        }
    }

    /// The first fire time strictly after `after`; `None` when there is none (within the
    /// years the cron library reaches).
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        // The cron is matched on the local wall clock, written as UTC so that the library
        // sees no offset change; each local time is then placed on the real clock.
        let mut local = self.search_from(after);
        // A few local times may map to `after` or before it (a repeated hour, a gap):
        // bounded, since each step moves the wall clock forward.
        for _ in 0..10_000 {
            let next = self.cron.find_next_occurrence(&local, false).ok()?;
            let instant = self.instant(next.naive_utc());
            if instant > after {
                return Some(instant);
            }
            local = next;
        }
        None
    }

    /// The next `n` fire times after `after`.
    pub fn next_runs(&self, after: DateTime<Utc>, n: usize) -> Vec<DateTime<Utc>> {
        let mut runs = Vec::with_capacity(n);
        let mut at = after;
        while runs.len() < n {
            match self.next_after(at) {
                Some(next) => {
                    runs.push(next);
                    at = next;
                }
                None => break,
            }
        }
        runs
    }

    /// The fire times from `from` (included) to `now` (included), oldest first: at most
    /// the last [`MAX_DUE`]. Walked forward from a window before `now` that doubles until
    /// it holds that many or reaches `from`, so the work is about that of a hundred fire
    /// times however long no coordinator ran (a walk from `from` would take a step per
    /// missed fire time: 600,000 for a per-second cron missed for a week).
    pub fn due(&self, from: DateTime<Utc>, now: DateTime<Utc>) -> Vec<DateTime<Utc>> {
        let mut window = TimeDelta::minutes(1);
        loop {
            let start = now.checked_sub_signed(window).filter(|start| *start > from);
            let due = self.walk(start.unwrap_or(from), now);
            match start {
                Some(_) if due.len() < MAX_DUE => window = window * 2,
                _ => return due,
            }
        }
    }

    /// [`Schedule::due`], walked from `from`.
    fn walk(&self, from: DateTime<Utc>, now: DateTime<Utc>) -> Vec<DateTime<Utc>> {
        let mut due = std::collections::VecDeque::new();
        let mut at = from - TimeDelta::milliseconds(1);
        while let Some(next) = self.next_after(at) {
            if next > now {
                break;
            }
            if due.len() == MAX_DUE {
                due.pop_front();
            }
            due.push_back(next);
            at = next;
        }
        due.into()
    }

    /// `at` on this time zone's wall clock, written as a UTC time, in whole seconds (the
    /// cron's finest field).
    fn wall_clock(&self, at: DateTime<Utc>) -> DateTime<Utc> {
        let local = at.with_timezone(&self.timezone).naive_local();
        Self::whole_seconds(local)
    }

    /// The wall-clock time to search for the next fire after `after` from. A time the
    /// clocks skipped fires on the offset before the change ([`Self::instant`]), so in
    /// the hours after the clocks went forward it can lie after `after` although its
    /// wall-clock time is before `after`'s (02:30 in Paris fires at 01:30 UTC, when the
    /// clocks already read 03:30). There `after` is read on the earlier, smaller offset;
    /// [`Self::next_after`] skips what that finds at or before `after`.
    fn search_from(&self, after: DateTime<Utc>) -> DateTime<Utc> {
        let now = self.wall_clock(after);
        // Longer than any clock change.
        let earlier = after - TimeDelta::hours(3);
        let offset = self
            .timezone
            .offset_from_utc_datetime(&earlier.naive_utc())
            .fix()
            .local_minus_utc();
        let on_earlier = Self::whole_seconds(after.naive_utc() + TimeDelta::seconds(offset.into()));
        now.min(on_earlier)
    }

    fn whole_seconds(local: NaiveDateTime) -> DateTime<Utc> {
        Utc.from_utc_datetime(&local.with_nanosecond(0).unwrap_or(local))
    }

    /// The instant a wall-clock time stands for: its first occurrence when the clocks go
    /// back; when they go forward past it, the instant it would have been with the offset
    /// before the change.
    fn instant(&self, local: NaiveDateTime) -> DateTime<Utc> {
        match self.timezone.from_local_datetime(&local) {
            chrono::LocalResult::Single(at) => at.with_timezone(&Utc),
            chrono::LocalResult::Ambiguous(first, _) => first.with_timezone(&Utc),
            chrono::LocalResult::None => {
                // In a gap: an hour earlier is before it, on the old offset.
                let before = local - TimeDelta::hours(1);
                let offset_before = self
                    .timezone
                    .from_local_datetime(&before)
                    .earliest()
                    .map_or(TimeDelta::zero(), |at| {
                        at.naive_local() - at.with_timezone(&Utc).naive_utc()
                    });
                Utc.from_utc_datetime(&(local - offset_before))
            }
        }
    }
}

/// Which of a schedule's due fire times (oldest first) to run now, and which it missed:
/// a time past by more than `grace` was missed (no coordinator ran then); `catch_up` says
/// which of those still run. Returns each time with whether it runs.
pub fn plan(
    due: &[DateTime<Utc>],
    now: DateTime<Utc>,
    grace: TimeDelta,
    catch_up: CatchUp,
) -> Vec<(DateTime<Utc>, bool)> {
    let on_time = |at: &DateTime<Utc>| now - *at <= grace;
    let newest_late = due.iter().rposition(|at| !on_time(at));
    let any_on_time = due.iter().any(on_time);
    due.iter()
        .enumerate()
        .map(|(i, at)| {
            let runs = on_time(at)
                || match catch_up {
                    CatchUp::All => true,
                    CatchUp::Latest => !any_on_time && Some(i) == newest_late,
                    CatchUp::None => false,
                };
            (*at, runs)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missed_fire_times_run_as_catch_up_says() {
        let now = utc("2026-12-05T12:00:00Z");
        let grace = TimeDelta::seconds(10);
        // Three windows while no coordinator ran.
        let missed = [
            utc("2026-12-05T11:57:00Z"),
            utc("2026-12-05T11:58:00Z"),
            utc("2026-12-05T11:59:00Z"),
        ];
        let runs = |catch_up| -> Vec<bool> {
            plan(&missed, now, grace, catch_up)
                .into_iter()
                .map(|(_, runs)| runs)
                .collect()
        };
        assert_eq!(runs(CatchUp::None), [false, false, false]);
        assert_eq!(runs(CatchUp::Latest), [false, false, true]);
        assert_eq!(runs(CatchUp::All), [true, true, true]);
        // A time a little late is on time, whatever `catch_up` says; with one on time,
        // `latest` runs no missed one.
        let late = [utc("2026-12-05T11:58:00Z"), utc("2026-12-05T11:59:55Z")];
        for catch_up in [CatchUp::None, CatchUp::Latest] {
            let runs: Vec<bool> = plan(&late, now, grace, catch_up)
                .into_iter()
                .map(|(_, runs)| runs)
                .collect();
            assert_eq!(runs, [false, true], "{catch_up}");
        }
    }

    fn utc(text: &str) -> DateTime<Utc> {
        text.parse().unwrap()
    }

    /// The fire times between two instants.
    fn fires(schedule: &Schedule, from: &str, to: &str) -> Vec<String> {
        schedule
            .due(utc(from), utc(to))
            .into_iter()
            .map(|at| at.to_rfc3339())
            .collect()
    }

    #[test]
    fn two_thirty_in_paris_fires_once_on_both_daylight_saving_nights() {
        let schedule = Schedule::parse("30 2 * * *", "Europe/Paris").unwrap();
        // Spring forward, 2026-03-29: 02:00 CET becomes 03:00 CEST; 02:30 does not occur
        // and fires at 03:30 CEST (01:30 UTC).
        assert_eq!(
            fires(&schedule, "2026-03-28T00:00:00Z", "2026-03-30T12:00:00Z"),
            [
                "2026-03-28T01:30:00+00:00",
                "2026-03-29T01:30:00+00:00",
                "2026-03-30T00:30:00+00:00",
            ]
        );
        // Fall back, 2026-10-25: 03:00 CEST becomes 02:00 CET; 02:30 occurs twice and
        // fires at the first (00:30 UTC), not at the second (01:30 UTC).
        assert_eq!(
            fires(&schedule, "2026-10-24T00:00:00Z", "2026-10-26T12:00:00Z"),
            [
                "2026-10-24T00:30:00+00:00",
                "2026-10-25T00:30:00+00:00",
                "2026-10-26T01:30:00+00:00",
            ]
        );
    }

    /// The scheduler asks for the fires due from the stored next fire time on: on the
    /// night the clocks go forward, that is the skipped time itself, whose wall clock
    /// (03:30 CEST) is past the one it stands for (02:30).
    #[test]
    fn a_skipped_time_is_due_from_its_own_instant() {
        let schedule = Schedule::parse("30 2 * * *", "Europe/Paris").unwrap();
        let stored = schedule.next_after(utc("2026-03-28T01:30:00Z")).unwrap();
        assert_eq!(stored.to_rfc3339(), "2026-03-29T01:30:00+00:00");
        assert_eq!(
            fires(&schedule, "2026-03-29T01:30:00Z", "2026-03-29T01:30:05Z"),
            ["2026-03-29T01:30:00+00:00"]
        );
        // Asked from within the hour after the change, the next fire is still that one.
        assert_eq!(
            schedule
                .next_after(utc("2026-03-29T01:10:00Z"))
                .map(|at| at.to_rfc3339()),
            Some("2026-03-29T01:30:00+00:00".to_owned())
        );
        let new_york = Schedule::parse("30 2 * * *", "America/New_York").unwrap();
        let stored = new_york.next_after(utc("2026-03-07T07:30:00Z")).unwrap();
        assert_eq!(stored.to_rfc3339(), "2026-03-08T07:30:00+00:00");
        assert_eq!(
            fires(&new_york, "2026-03-08T07:30:00Z", "2026-03-08T07:30:01Z"),
            ["2026-03-08T07:30:00+00:00"]
        );
        // A schedule every second still finds its next fire just after a change.
        let every_second = Schedule::parse("* * * * * *", "Europe/Paris").unwrap();
        assert_eq!(
            every_second
                .next_after(utc("2026-03-29T01:00:30Z"))
                .map(|at| at.to_rfc3339()),
            Some("2026-03-29T01:00:31+00:00".to_owned())
        );
    }

    #[test]
    fn an_hourly_schedule_keeps_one_fire_per_wall_clock_hour_across_the_changes() {
        let schedule = Schedule::parse("30 * * * *", "Europe/Paris").unwrap();
        // Spring forward: 02:30 (skipped) and 03:30 land on the same instant: one fire.
        let spring = fires(&schedule, "2026-03-29T00:00:00Z", "2026-03-29T02:59:00Z");
        assert_eq!(
            spring,
            [
                "2026-03-29T00:30:00+00:00",
                "2026-03-29T01:30:00+00:00",
                "2026-03-29T02:30:00+00:00"
            ]
        );
        // Fall back: the repeated 02:30 fires once.
        let autumn = fires(&schedule, "2026-10-24T23:00:00Z", "2026-10-25T02:59:00Z");
        assert_eq!(
            autumn,
            [
                "2026-10-24T23:30:00+00:00",
                "2026-10-25T00:30:00+00:00",
                "2026-10-25T02:30:00+00:00",
            ]
        );
    }

    #[test]
    fn six_fields_have_seconds_and_due_is_bounded() {
        let schedule = Schedule::parse("*/15 * * * * *", "UTC").unwrap();
        assert_eq!(
            schedule.next_runs(utc("2026-01-01T00:00:07Z"), 3),
            [
                utc("2026-01-01T00:00:15Z"),
                utc("2026-01-01T00:00:30Z"),
                utc("2026-01-01T00:00:45Z")
            ]
        );
        // `from` is included; at most the last hundred.
        assert_eq!(
            schedule.due(utc("2026-01-01T00:00:15Z"), utc("2026-01-01T00:00:30Z")),
            [utc("2026-01-01T00:00:15Z"), utc("2026-01-01T00:00:30Z")]
        );
        let day = schedule.due(utc("2026-01-01T00:00:00Z"), utc("2026-01-02T00:00:00Z"));
        assert_eq!(day.len(), MAX_DUE);
        assert_eq!(day.last(), Some(&utc("2026-01-02T00:00:00Z")));
    }

    /// The last hundred fire times, found from a window before `now`, are those a walk
    /// from `from` keeps, across daylight-saving changes, sparse and dense crons.
    #[test]
    fn due_finds_the_last_fire_times_as_a_walk_from_the_start_does() {
        for (cron, zone) in [
            ("* * * * * *", "UTC"),
            ("*/7 * * * *", "Europe/Paris"),
            ("30 2 * * *", "Europe/Paris"),
            ("0 0 1 1 *", "UTC"),
            ("15 1-3 * * 0", "America/New_York"),
        ] {
            let schedule = Schedule::parse(cron, zone).unwrap();
            for (from, now) in [
                ("2026-10-24T00:00:00Z", "2026-10-26T12:00:00Z"),
                ("2026-03-01T00:00:00Z", "2026-04-01T00:00:00Z"),
                ("2020-01-01T00:00:00Z", "2026-12-07T09:00:00Z"),
                ("2026-12-07T08:59:59Z", "2026-12-07T09:00:00Z"),
            ] {
                let (from, now) = (utc(from), utc(now));
                // The walk from `from` is the slow way: kept short for the dense crons.
                let longest = match cron {
                    "* * * * * *" => TimeDelta::days(1),
                    "*/7 * * * *" => TimeDelta::days(60),
                    _ => TimeDelta::MAX,
                };
                if now - from > longest {
                    continue;
                }
                assert_eq!(
                    schedule.due(from, now),
                    schedule.walk(from, now),
                    "{cron} {zone} {from}"
                );
            }
        }
        // Windows that start at a change of the clocks (Paris: 01:00 UTC on 2026-03-29 and
        // 2026-10-25): a hundred fires of */7 take a window of 1,024 minutes, which from
        // 17:54 starts at 00:50; per second, two minutes, from 01:01:30 (and during the
        // hour that repeats, nothing fires a second time, so the window grows past it).
        for (cron, from, now) in [
            (
                "*/7 * * * *",
                "2026-10-24T12:00:00Z",
                "2026-10-25T17:54:00Z",
            ),
            (
                "*/7 * * * *",
                "2026-03-28T12:00:00Z",
                "2026-03-29T17:54:00Z",
            ),
            (
                "* * * * * *",
                "2026-10-25T00:00:00Z",
                "2026-10-25T01:01:30Z",
            ),
            (
                "* * * * * *",
                "2026-10-25T00:00:00Z",
                "2026-10-25T01:30:00Z",
            ),
            (
                "* * * * * *",
                "2026-03-29T00:00:00Z",
                "2026-03-29T01:01:30Z",
            ),
        ] {
            let schedule = Schedule::parse(cron, "Europe/Paris").unwrap();
            let (from, now) = (utc(from), utc(now));
            let due = schedule.due(from, now);
            assert_eq!(due.len(), MAX_DUE, "{cron} {now}");
            assert_eq!(due, schedule.walk(from, now), "{cron} {now}");
        }
        // A per-second cron missed for ten years: the last hundred, at once.
        let every_second = Schedule::parse("* * * * * *", "UTC").unwrap();
        let due = every_second.due(utc("2016-01-01T00:00:00Z"), utc("2026-01-01T00:00:00Z"));
        assert_eq!(due.len(), MAX_DUE);
        assert_eq!(due.first(), Some(&utc("2025-12-31T23:58:21Z")));
    }

    #[test]
    fn bad_crons_and_zones_are_named() {
        let problems = Schedule::parse("61 * * *", "Mars/Olympus").unwrap_err();
        let fields: Vec<&str> = problems.iter().map(|(field, _)| *field).collect();
        assert_eq!(fields, ["cron", "timezone"], "{problems:?}");
        assert!(problems[0].1.contains("4 fields"), "{problems:?}");
        let problems = Schedule::parse("61 * * * *", "UTC").unwrap_err();
        assert_eq!(problems[0].0, "cron");
        let problems = Schedule::parse("0 0 31 2 *", "UTC").unwrap_err();
        assert!(problems[0].1.contains("never fires"), "{problems:?}");
        assert!(Schedule::parse("0 7 * * MON-FRI", "America/New_York").is_ok());
        assert!(Schedule::parse("0 0 7 * * * 2030", "UTC").is_err());
    }
}
