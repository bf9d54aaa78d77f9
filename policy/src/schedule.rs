//! Time windows: whether an instant is inside a recurring window, and the absolute ranges a
//! window covers over a period (what nodes receive, so they need no time-zone database).

use jiff::Timestamp;
use jiff::civil::{Date, Time};

use crate::ast::Schedule;

impl Schedule {
    /// Whether `at` falls inside the window.
    pub(crate) fn contains(&self, at: Timestamp) -> bool {
        let dt = self.tz.to_datetime(at);
        let wd = weekday(dt.date());
        let m = u16::try_from(i32::from(dt.hour()) * 60 + i32::from(dt.minute())).unwrap_or(0);
        match self.hours {
            None => self.days[wd],
            Some((a, b)) if a < b => self.days[wd] && a <= m && m < b,
            Some((a, b)) => (self.days[wd] && m >= a) || (self.days[(wd + 6) % 7] && m < b),
        }
    }

    /// The absolute `[from, until)` ranges (Unix seconds) the window covers within
    /// `[start, end)`, merged and sorted.
    pub(crate) fn ranges(&self, start: Timestamp, end: Timestamp) -> Vec<(i64, i64)> {
        let (s, e) = (start.as_second(), end.as_second());
        let mut out: Vec<(i64, i64)> = Vec::new();
        let first = self
            .tz
            .to_datetime(start)
            .date()
            .yesterday()
            .unwrap_or(Date::MIN);
        let mut day = first;
        loop {
            let day_start = self.local(day, 0);
            if day_start.is_some_and(|t| t >= e) {
                break;
            }
            if self.days[weekday(day)] {
                let (a, b) = self.hours.unwrap_or((0, 24 * 60));
                let from = self.local(day, a);
                let until = if b > a {
                    self.local(day, b)
                } else {
                    day.tomorrow().ok().and_then(|d| self.local(d, b))
                };
                if let (Some(f), Some(u)) = (from, until) {
                    let (f, u) = (f.max(s), u.min(e));
                    if f < u {
                        match out.last_mut() {
                            Some(last) if last.1 >= f => last.1 = last.1.max(u),
                            _ => out.push((f, u)),
                        }
                    }
                }
            }
            let Ok(next) = day.tomorrow() else { break };
            day = next;
        }
        out
    }

    /// Unix seconds of local `minutes` after midnight on `day` (24:00 is the next midnight);
    /// times in a DST gap move forward, as clocks do.
    fn local(&self, day: Date, minutes: u16) -> Option<i64> {
        let (day, minutes) = if minutes >= 24 * 60 {
            (day.tomorrow().ok()?, minutes - 24 * 60)
        } else {
            (day, minutes)
        };
        let t = Time::new(
            i8::try_from(minutes / 60).ok()?,
            i8::try_from(minutes % 60).ok()?,
            0,
            0,
        )
        .ok()?;
        let ts = self
            .tz
            .to_ambiguous_timestamp(day.to_datetime(t))
            .compatible()
            .ok()?;
        Some(ts.as_second())
    }
}

/// Monday = 0.
fn weekday(d: Date) -> usize {
    usize::try_from(d.weekday().to_monday_zero_offset()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use jiff::tz::TimeZone;

    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn office(tz: &str) -> Schedule {
        Schedule {
            days: [true, true, true, true, true, false, false],
            hours: Some((9 * 60, 17 * 60)),
            tz: TimeZone::get(tz).unwrap(),
        }
    }

    #[test]
    fn office_hours_in_a_time_zone() {
        let s = office("Europe/Berlin");
        // Monday 2026-11-23, Berlin is UTC+1
        assert!(s.contains(ts("2026-11-23T08:00:00Z"))); // 09:00 local
        assert!(!s.contains(ts("2026-11-23T07:59:59Z")));
        assert!(!s.contains(ts("2026-11-23T16:00:00Z"))); // 17:00 local, end exclusive
        assert!(!s.contains(ts("2026-11-28T10:00:00Z"))); // Saturday
    }

    #[test]
    fn overnight_windows_wrap_into_the_next_day() {
        let s = Schedule {
            days: [false, false, false, false, true, false, false], // Friday
            hours: Some((22 * 60, 2 * 60)),
            tz: TimeZone::UTC,
        };
        assert!(s.contains(ts("2026-11-27T23:00:00Z"))); // Friday 23:00
        assert!(s.contains(ts("2026-11-28T01:59:00Z"))); // Saturday 01:59, from Friday
        assert!(!s.contains(ts("2026-11-28T23:00:00Z"))); // Saturday night
    }

    #[test]
    fn ranges_follow_dst_changes() {
        let s = Schedule {
            days: [true; 7],
            hours: Some((9 * 60, 10 * 60)),
            tz: TimeZone::get("Europe/Berlin").unwrap(),
        };
        // Berlin leaves summer time on 2026-10-25.
        let r = s.ranges(ts("2026-10-24T00:00:00Z"), ts("2026-10-26T00:00:00Z"));
        assert_eq!(
            r,
            vec![
                (
                    ts("2026-10-24T07:00:00Z").as_second(),
                    ts("2026-10-24T08:00:00Z").as_second()
                ),
                (
                    ts("2026-10-25T08:00:00Z").as_second(),
                    ts("2026-10-25T09:00:00Z").as_second()
                ),
            ]
        );
    }

    #[test]
    fn ranges_agree_with_contains() {
        let s = office("America/New_York");
        let start = ts("2026-11-20T00:00:00Z");
        let end = ts("2026-11-30T00:00:00Z");
        let ranges = s.ranges(start, end);
        let mut t = start.as_second();
        while t < end.as_second() {
            let inside = ranges.iter().any(|(a, b)| *a <= t && t < *b);
            assert_eq!(
                inside,
                s.contains(Timestamp::from_second(t).unwrap()),
                "at {t}"
            );
            t += 15 * 60;
        }
    }

    #[test]
    fn whole_days_merge_into_one_range() {
        let s = Schedule {
            days: [true, true, false, false, false, false, false],
            hours: None,
            tz: TimeZone::UTC,
        };
        let r = s.ranges(ts("2026-11-23T00:00:00Z"), ts("2026-11-30T00:00:00Z"));
        assert_eq!(
            r,
            vec![(
                ts("2026-11-23T00:00:00Z").as_second(),
                ts("2026-11-25T00:00:00Z").as_second()
            )]
        );
    }
}
