//! `[prefetch]`: manifest-driven prefetch (docs/ARCHITECTURE.md, "Prefetch").

use toml::Table;

use super::Errors;

/// `[prefetch]`: when berth serves an image manifest it fetched or revalidated, it starts fills
/// for the image's config and layers that are not cached yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefetchConfig {
    /// Off with `enabled = false`.
    pub enabled: bool,
    /// Fills one image's prefetch runs at once.
    pub per_image: usize,
    /// Prefetch fills at once across all images; never more than half of
    /// `cache.max_concurrent_fills`, so clients' own misses always find slots.
    pub max_concurrent: usize,
}

impl Default for PrefetchConfig {
    fn default() -> PrefetchConfig {
        PrefetchConfig {
            enabled: true,
            per_image: 8,
            max_concurrent: 16,
        }
    }
}

impl PrefetchConfig {
    /// The global limit in effect with `max_concurrent_fills` fill slots: at most half of them
    /// (at least one).
    pub fn effective_max_concurrent(&self, max_concurrent_fills: usize) -> usize {
        self.max_concurrent.min((max_concurrent_fills / 2).max(1))
    }
}

impl Errors {
    /// `[prefetch]`; the defaults when the table is absent.
    pub(super) fn prefetch(&mut self, table: &mut Table) -> PrefetchConfig {
        if table.get("prefetch").is_none() {
            return PrefetchConfig::default();
        }
        let mut t = self.table(table, "prefetch");
        let d = PrefetchConfig::default();
        let c = PrefetchConfig {
            enabled: self.bool(&mut t, "prefetch.enabled").unwrap_or(d.enabled),
            per_image: self
                .count(&mut t, "prefetch.per_image", 1..=256)
                .unwrap_or(d.per_image),
            max_concurrent: self
                .count(&mut t, "prefetch.max_concurrent", 1..=4096)
                .unwrap_or(d.max_concurrent),
        };
        self.unknown(&t, "prefetch");
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    const BASE: &str = "[[upstream]]\nname = \"hub\"\nurl = \"https://registry-1.docker.io\"\n";

    #[test]
    fn defaults_without_the_table() {
        let c = Config::from_toml(BASE).unwrap();
        assert_eq!(c.prefetch, PrefetchConfig::default());
        assert!(c.prefetch.enabled);
    }

    #[test]
    fn keys_are_read_and_checked() {
        let c = Config::from_toml(&format!(
            "{BASE}[prefetch]\nenabled = false\nper_image = 3\nmax_concurrent = 5\n"
        ))
        .unwrap();
        assert_eq!(
            c.prefetch,
            PrefetchConfig {
                enabled: false,
                per_image: 3,
                max_concurrent: 5
            }
        );
        let e = Config::from_toml(&format!(
            "{BASE}[prefetch]\nper_image = 0\nmax_concurrent = \"many\"\nspeed = 1\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("prefetch.per_image: expected a number from 1"),
            "{e}"
        );
        assert!(
            e.contains("prefetch.max_concurrent: expected a number"),
            "{e}"
        );
        assert!(e.contains("prefetch.speed: unknown key"), "{e}");
    }

    #[test]
    fn prefetch_leaves_clients_half_the_fill_slots() {
        let c = PrefetchConfig::default();
        assert_eq!(c.effective_max_concurrent(64), 16);
        assert_eq!(c.effective_max_concurrent(10), 5);
        assert_eq!(c.effective_max_concurrent(1), 1);
    }
}
