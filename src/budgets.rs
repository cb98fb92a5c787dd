//! Spending budgets of client keys: what a key's answers cost at the answering model's
//! `price_per_million_tokens`, summed per UTC day, per UTC month or in total, and refused
//! with OpenAI's own 429 `insufficient_quota` once the budget is used up.
//!
//! A budget is checked when a request arrives and charged when its answer is known, so the
//! request that crosses the budget completes and the ones after it are refused. With
//! `spend_file`, what each key has spent survives restarts: the file is written every few
//! seconds while spend changes and when the server stops, and read at start.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::Error;

/// Over which span a budget's spend is summed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    /// A UTC calendar day.
    Day,
    /// A UTC calendar month.
    Month,
    /// For ever: the budget never renews.
    Total,
}

impl Period {
    /// The period holding the moment `unix_secs`: its label, as the spend file keeps it
    /// (`2026-12-03`, `2026-12`, `total`), and when the next one begins (`None` for `total`).
    #[must_use]
    pub fn at(self, unix_secs: u64) -> (String, Option<u64>) {
        let days = i64::try_from(unix_secs / 86_400).unwrap_or(i64::MAX);
        let (year, month, day) = civil_from_days(days);
        match self {
            Period::Day => (
                format!("{year:04}-{month:02}-{day:02}"),
                Some(unix_secs - unix_secs % 86_400 + 86_400),
            ),
            Period::Month => {
                let (next_year, next_month) = if month == 12 { (year + 1, 1) } else { (year, month + 1) };
                let next = days_from_civil(next_year, next_month, 1);
                (
                    format!("{year:04}-{month:02}"),
                    u64::try_from(next).ok().map(|days| days * 86_400),
                )
            }
            Period::Total => ("total".to_owned(), None),
        }
    }

    /// "today", "this month" or "in total", for messages.
    fn describe(self) -> &'static str {
        match self {
            Period::Day => "today (UTC)",
            Period::Month => "this month (UTC)",
            Period::Total => "in total",
        }
    }
}

/// A key's `budget`: at most `limit` (in the models' price currency) per `per`.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    pub limit: f64,
    pub per: Period,
}

/// What a key has spent in one period.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Spend {
    pub period: String,
    pub spent: f64,
}

impl Spend {
    /// Moves the spend into the period holding `unix_secs` (a new period starts at zero)
    /// and returns when that period ends.
    pub fn roll(&mut self, per: Period, unix_secs: u64) -> Option<u64> {
        let (period, ends) = per.at(unix_secs);
        if self.period != period {
            self.period = period;
            self.spent = 0.0;
        }
        ends
    }
}

/// A request refused because its key's budget is used up.
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetExceeded {
    pub key: String,
    pub budget: Budget,
    pub spent: f64,
    /// When the budget renews (unix seconds); `None` for a `total` budget.
    pub renews_at: Option<u64>,
}

impl std::fmt::Display for BudgetExceeded {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            formatter,
            "You exceeded your current quota: API key `{}` has spent {:.4} of its budget of {} {}.",
            self.key,
            self.spent,
            self.budget.limit,
            self.budget.per.describe()
        )?;
        match self.renews_at {
            Some(at) => {
                let days = i64::try_from(at / 86_400).unwrap_or(i64::MAX);
                let (year, month, day) = civil_from_days(days);
                write!(formatter, " It renews at {year:04}-{month:02}-{day:02}T00:00:00Z.")
            }
            None => write!(formatter, " It does not renew; ask for a larger budget."),
        }
    }
}

/// The spend file's contents.
#[derive(Debug, Default, Serialize, Deserialize)]
struct SpendFile {
    version: u32,
    /// By key name.
    keys: BTreeMap<String, Spend>,
}

/// What each key had spent, by name, from `path`; nothing if the file does not exist yet.
pub fn load(path: &Path) -> Result<BTreeMap<String, Spend>, Error> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(cause) => return Err(Error::io(path.display().to_string(), cause)),
    };
    let file: SpendFile = serde_json::from_str(&text)
        .map_err(|error| Error::Config(format!("spend_file {}: {error}", path.display())))?;
    if file.version != 1 {
        return Err(Error::Config(format!(
            "spend_file {}: version {} is not one this build reads (1)",
            path.display(),
            file.version
        )));
    }
    Ok(file.keys)
}

/// Writes what each key has spent to `path`, replacing the file whole (a crash mid-write
/// leaves the previous one).
pub fn save(path: &Path, keys: BTreeMap<String, Spend>) -> Result<(), Error> {
    let io = |cause| Error::io(path.display().to_string(), cause);
    let text = serde_json::to_string_pretty(&SpendFile { version: 1, keys })
        .map_err(|error| Error::Internal(format!("spend file: {error}")))?;
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    let partial = std::path::PathBuf::from(partial);
    std::fs::write(&partial, text).map_err(io)?;
    std::fs::rename(&partial, path).map_err(io)
}

/// The civil date (year, month, day) of `days` since 1970-01-01: Howard Hinnant's
/// `civil_from_days`, exact over the proleptic Gregorian calendar.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    // Both are in range by construction (1..=31, 1..=12).
    (year, u32::try_from(month).unwrap_or(1), u32::try_from(day).unwrap_or(1))
}

/// Days since 1970-01-01 of a civil date: the inverse of [`civil_from_days`].
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year.rem_euclid(400);
    let month = i64::from(month);
    let day_of_year = (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_are_utc_days_and_months_with_their_ends() {
        // 2026-12-31T23:59:59Z and the second after it.
        let last = 1_798_761_599;
        assert_eq!(Period::Day.at(last), ("2026-12-31".to_owned(), Some(last + 1)));
        assert_eq!(Period::Month.at(last), ("2026-12".to_owned(), Some(last + 1)));
        assert_eq!(
            Period::Month.at(last + 1),
            ("2027-01".to_owned(), Some(1_801_439_999 + 1))
        );
        // A leap February ends on the 29th.
        let leap = days_from_civil(2028, 2, 29);
        assert_eq!(civil_from_days(leap), (2028, 2, 29));
        assert_eq!(civil_from_days(leap + 1), (2028, 3, 1));
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(Period::Total.at(last), ("total".to_owned(), None));
        for days in [0, 59, 365, 10_956, 20_000, 20_789, 60_000] {
            let (year, month, day) = civil_from_days(days);
            assert_eq!(days_from_civil(year, month, day), days, "{year}-{month}-{day}");
        }
    }

    #[test]
    fn spend_starts_over_in_a_new_period_only() {
        let mut spend = Spend::default();
        let noon = 1_796_299_200; // 2026-12-03T12:00:00Z
        assert_eq!(spend.roll(Period::Day, noon), Some(1_796_342_400));
        spend.spent = 4.5;
        spend.roll(Period::Day, noon + 3_600);
        assert!((spend.spent - 4.5).abs() < f64::EPSILON, "same day");
        spend.roll(Period::Day, noon + 86_400);
        assert_eq!(
            spend,
            Spend {
                period: "2026-12-04".into(),
                spent: 0.0
            }
        );
    }

    #[test]
    fn the_spend_file_round_trips_and_a_missing_one_is_empty() {
        let scratch = tempfile::tempdir().unwrap();
        let dir = scratch.path();
        let path = dir.join("spend.json");
        assert!(load(&path).unwrap().is_empty());
        let keys = BTreeMap::from([(
            "team-a".to_owned(),
            Spend {
                period: "2026-12".into(),
                spent: 1.25,
            },
        )]);
        save(&path, keys.clone()).unwrap();
        assert_eq!(load(&path).unwrap(), keys);
        std::fs::write(&path, r#"{"version": 2, "keys": {}}"#).unwrap();
        assert!(load(&path).unwrap_err().to_string().contains("version 2"));
    }
}
