//! Plain-text tables and the number formats shown in them.

/// Column alignment: names left, numbers right (so digits line up).
#[derive(Clone, Copy)]
pub enum Align {
    Left,
    Right,
}

pub struct Table {
    columns: Vec<(String, Align)>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(columns: &[(&str, Align)]) -> Table {
        Table {
            columns: columns.iter().map(|&(h, a)| (h.to_string(), a)).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.columns.len());
        self.rows.push(cells);
    }

    /// Columns two spaces apart; the last one is not padded (no trailing blanks).
    pub fn render(&self) -> String {
        let header: Vec<String> = self.columns.iter().map(|(h, _)| h.clone()).collect();
        let widths: Vec<usize> = (0..self.columns.len())
            .map(|i| {
                let cells = std::iter::once(&header).chain(&self.rows);
                cells.map(|r| r[i].chars().count()).max().unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        for row in std::iter::once(&header).chain(&self.rows) {
            out.push_str(&self.line(row, &widths));
            out.push('\n');
        }
        out
    }

    fn line(&self, row: &[String], widths: &[usize]) -> String {
        let last = row.len() - 1;
        let cells: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(i, cell)| match self.columns[i].1 {
                Align::Left if i == last => cell.clone(),
                Align::Left => format!("{cell:<w$}", w = widths[i]),
                Align::Right => format!("{cell:>w$}", w = widths[i]),
            })
            .collect();
        cells.join("  ")
    }
}

/// Bytes in binary units with one decimal, as `ls -lh`: 512B, 1.5K, 1.0G.
pub fn size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["K", "M", "G", "T", "P", "E"];
    if bytes < 1024 {
        return format!("{bytes}B");
    }
    let mut v = bytes as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1}{}", UNITS[unit])
}

/// A duration in nanoseconds with a unit that keeps it short: 850ns, 12.3us, 1.2ms, 2.50s.
pub fn nanos(ns: f64) -> String {
    if ns < 1e3 {
        format!("{ns:.0}ns")
    } else if ns < 1e6 {
        format!("{:.1}us", ns / 1e3)
    } else if ns < 1e9 {
        format!("{:.1}ms", ns / 1e6)
    } else {
        format!("{:.2}s", ns / 1e9)
    }
}

/// A per-second rate: one decimal, as iostat(1).
pub fn rate(v: f64) -> String {
    format!("{v:.1}")
}

/// "yes" or "no".
pub fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(size(512), "512B");
        assert_eq!(size(1536), "1.5K");
        assert_eq!(size(1 << 30), "1.0G");
        assert_eq!(size(3 << 40), "3.0T");
    }

    #[test]
    fn durations() {
        assert_eq!(nanos(850.0), "850ns");
        assert_eq!(nanos(12_345.0), "12.3us");
        assert_eq!(nanos(1_250_000.0), "1.2ms");
        assert_eq!(nanos(2.5e9), "2.50s");
    }

    #[test]
    fn aligned() {
        let mut t = Table::new(&[
            ("NAME", Align::Left),
            ("N", Align::Right),
            ("X", Align::Left),
        ]);
        t.row(vec!["a".into(), "10".into(), "x".into()]);
        t.row(vec!["long".into(), "2".into(), "yy".into()]);
        assert_eq!(t.render(), "NAME   N  X\na     10  x\nlong   2  yy\n");
    }
}
