//! Median and spread of a handful of repeats, and how they are printed.

#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Summary {
    pub fn of(values: &[f64]) -> Self {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return Self {
                median: f64::NAN,
                min: f64::NAN,
                max: f64::NAN,
                n: 0,
            };
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Self {
            median,
            min: v[0],
            max: v[n - 1],
            n,
        }
    }

    /// `12.3 (10.1 … 14.0)` with `prec` decimals.
    pub fn show(&self, prec: usize) -> String {
        if self.n == 0 {
            return "n/a".into();
        }
        if self.n == 1 {
            return format!("{:.prec$}", self.median);
        }
        format!(
            "{:.prec$} ({:.prec$} … {:.prec$})",
            self.median, self.min, self.max
        )
    }

    /// Like [`Summary::show`] for ratios, as percentages.
    pub fn pct(&self, prec: usize) -> String {
        Self {
            median: self.median * 100.0,
            min: self.min * 100.0,
            max: self.max * 100.0,
            n: self.n,
        }
        .show(prec)
            + " %"
    }
}

pub fn human_count(v: f64) -> String {
    if !v.is_finite() {
        "n/a".into()
    } else if v >= 1e6 {
        format!("{:.2} M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1} k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

pub fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_spread() {
        let s = Summary::of(&[3.0, 1.0, 2.0, f64::NAN]);
        assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
        assert_eq!(Summary::of(&[1.0, 2.0, 3.0, 4.0]).median, 2.5);
        assert_eq!(Summary::of(&[]).show(1), "n/a");
        assert_eq!(Summary::of(&[0.5, 1.0]).pct(0), "75 (50 … 100) %");
    }
}
