//! Counters by template and result, with bounded cardinality: a name gets a series of its own
//! only if a template of that name exists for the pod; every other name counts as `other`. So the
//! series stay bounded by the templates that exist, whatever names pods write. Two families:
//! admissions by template, and shadow evaluations by template (§10).
//!
//! A name's counters are one shared [`Cells`]; a template entry keeps a [`CellSlot`] bound to
//! them at its first admission, so later admissions count without a lookup or a lock, and every
//! version of a template (an update, a re-parse) adds to the same series.

use std::collections::HashMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock, RwLock};

use super::RESULTS;

/// The `template` label of names that are not the name of a template.
pub const OTHER: &str = "other";

/// Admissions of pods naming a template, by template name and result.
pub type TemplateAdmissions = ByTemplate<{ RESULTS.len() }>;

/// Shadow templates evaluated (§10), by template name and result.
pub type ShadowEvaluations = ByTemplate<3>;

/// A template entry's place for its name's admission counters.
pub type AdmissionSlot = CellSlot<{ RESULTS.len() }>;

/// The counters of one template name, one per result.
#[derive(Debug)]
pub struct Cells<const N: usize> {
    /// The family they belong to: a slot bound to another family's cells (two servers in one
    /// process sharing a store, in tests) is not used for this one.
    family: usize,
    counts: [AtomicU64; N],
}

/// Where a template entry keeps its name's [`Cells`], bound at its first admission. Not part of
/// the entry's value: equal, and shown as nothing, whatever it holds.
#[derive(Clone, Default)]
pub struct CellSlot<const N: usize>(OnceLock<Arc<Cells<N>>>);

impl<const N: usize> PartialEq for CellSlot<N> {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl<const N: usize> std::fmt::Debug for CellSlot<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CellSlot")
    }
}

/// Tells the families apart (see [`Cells::family`]).
static FAMILIES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl Default for TemplateAdmissions {
    fn default() -> Self {
        ByTemplate::new(
            "template_admissions_total",
            "Admissions of pods naming a template, by template name (`other`: no such template) and result.",
            RESULTS,
        )
    }
}

impl Default for ShadowEvaluations {
    fn default() -> Self {
        ByTemplate::new(
            "shadow_total",
            "Shadow templates evaluated for admitted pods (never applied), by template name and result.",
            ["would_change", "no_change", "broken"],
        )
    }
}

#[derive(Debug)]
pub struct ByTemplate<const N: usize> {
    family: &'static str,
    help: &'static str,
    results: [&'static str; N],
    id: usize,
    /// Written only the first time a name is seen; read when a slot is bound, and by a scrape.
    by_name: RwLock<HashMap<Box<str>, Arc<Cells<N>>>>,
    other: [AtomicU64; N],
}

impl<const N: usize> ByTemplate<N> {
    fn new(family: &'static str, help: &'static str, results: [&'static str; N]) -> Self {
        let other = std::array::from_fn(|_| AtomicU64::new(0));
        let id = FAMILIES.fetch_add(1, Relaxed);
        ByTemplate { family, help, results, id, by_name: RwLock::default(), other }
    }

    /// The counters of the template name `name`, created the first time: takes the lock.
    fn cells(&self, name: &str) -> Arc<Cells<N>> {
        if let Some(cells) = self.by_name.read().unwrap_or_else(|e| e.into_inner()).get(name) {
            return cells.clone();
        }
        let mut write = self.by_name.write().unwrap_or_else(|e| e.into_inner());
        let new = || Arc::new(Cells { family: self.id, counts: std::array::from_fn(|_| AtomicU64::new(0)) });
        write.entry(name.into()).or_insert_with(new).clone()
    }

    fn result_index(&self, result: &str) -> Option<usize> {
        self.results.iter().position(|r| *r == result)
    }

    /// Counts one admission for each name of `names` (the pod's comma-separated list, as the
    /// pod wrote it); `exists` says whether a template of that name exists for the pod.
    pub fn count(&self, names: &str, result: &str, exists: impl Fn(&str) -> bool) {
        let Some(i) = self.result_index(result) else {
            return;
        };
        for name in names.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            match exists(name) {
                true => self.cells(name).counts[i].fetch_add(1, Relaxed),
                false => self.other[i].fetch_add(1, Relaxed),
            };
        }
    }

    /// Counts one admission of the template `name` whose entry holds `slot`: no lookup and no
    /// lock once the slot is bound (the entry's first admission binds it).
    pub fn count_template(&self, slot: &CellSlot<N>, name: &str, result: &str) {
        let Some(i) = self.result_index(result) else {
            return;
        };
        let bound = slot.0.get_or_init(|| self.cells(name));
        match bound.family == self.id {
            true => bound.counts[i].fetch_add(1, Relaxed),
            false => self.cells(name).counts[i].fetch_add(1, Relaxed),
        };
    }

    /// Counts one admission of a name that is no template for the pod.
    pub fn count_other(&self, result: &str) {
        if let Some(i) = self.result_index(result) {
            self.other[i].fetch_add(1, Relaxed);
        }
    }

    /// Appends the family to a Prometheus text exposition: only results that happened, names
    /// sorted (a stable scrape).
    pub fn render(&self, out: &mut String, prefix: &str) {
        let family = format!("{prefix}_{}", self.family);
        let _ = writeln!(out, "# HELP {family} {}", self.help);
        let _ = writeln!(out, "# TYPE {family} counter");
        let by_name = self.by_name.read().unwrap_or_else(|e| e.into_inner());
        // One allocation for the whole family: with 10,000 templates it is most of the scrape.
        out.reserve((by_name.len() + 1) * (family.len() + 48));
        let mut names: Vec<&str> = by_name.keys().map(|n| &**n).collect();
        names.sort_unstable();
        let rows = names.into_iter().map(|n| (n, &by_name[n].counts)).chain([(OTHER, &self.other)]);
        for (name, counts) in rows {
            for (result, count) in self.results.iter().zip(counts) {
                let count = count.load(Relaxed);
                if count > 0 {
                    let name = escape_label_value(name);
                    let _ = writeln!(out, "{family}{{template=\"{name}\",result=\"{result}\"}} {count}");
                }
            }
        }
    }
}

/// A label value in the text exposition: API-server names never need it, but keys of ConfigMaps
/// read from files are not validated.
fn escape_label_value(value: &str) -> std::borrow::Cow<'_, str> {
    if !value.contains(['\\', '"', '\n']) {
        return value.into();
    }
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n").into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rendered(t: &TemplateAdmissions) -> Vec<String> {
        let mut out = String::new();
        t.render(&mut out, "p");
        out.lines().filter(|l| !l.starts_with('#')).map(str::to_owned).collect()
    }

    #[test]
    fn existing_names_get_their_own_series_and_every_other_name_one_value() {
        let t = TemplateAdmissions::default();
        let exists = |n: &str| ["gpu", "a100"].contains(&n);
        t.count("gpu", "mutated", exists);
        t.count("gpu, a100", "mutated", exists);
        t.count("a100,nope", "denied", exists);
        for i in 0..1000 {
            t.count(&format!("made-up-{i}"), "unchanged", exists);
        }
        assert_eq!(
            rendered(&t),
            [
                "p_template_admissions_total{template=\"a100\",result=\"mutated\"} 1",
                "p_template_admissions_total{template=\"a100\",result=\"denied\"} 1",
                "p_template_admissions_total{template=\"gpu\",result=\"mutated\"} 2",
                "p_template_admissions_total{template=\"other\",result=\"unchanged\"} 1000",
                "p_template_admissions_total{template=\"other\",result=\"denied\"} 1",
            ]
        );
    }

    #[test]
    fn label_values_are_escaped() {
        let t = TemplateAdmissions::default();
        t.count("a\"b\\c", "mutated", |_| true);
        assert_eq!(rendered(&t), ["p_template_admissions_total{template=\"a\\\"b\\\\c\",result=\"mutated\"} 1"]);
    }

    #[test]
    fn a_name_is_judged_on_every_admission() {
        // A template deleted since: its name counts as `other` from then on.
        let t = TemplateAdmissions::default();
        t.count("gpu", "mutated", |_| true);
        t.count("gpu", "mutated", |_| false);
        assert_eq!(
            rendered(&t),
            [
                "p_template_admissions_total{template=\"gpu\",result=\"mutated\"} 1",
                "p_template_admissions_total{template=\"other\",result=\"mutated\"} 1",
            ]
        );
    }

    #[test]
    fn a_slot_counts_into_its_name_across_entry_versions_and_only_in_its_own_family() {
        let (t, u) = (TemplateAdmissions::default(), TemplateAdmissions::default());
        // Two versions of the template `gpu` (an update), each entry with its own slot.
        let (v1, v2) = (AdmissionSlot::default(), AdmissionSlot::default());
        t.count_template(&v1, "gpu", "mutated");
        t.count_template(&v1, "gpu", "mutated");
        t.count_template(&v2, "gpu", "denied");
        t.count("gpu", "mutated", |_| true);
        t.count_other("unchanged");
        // A slot bound in `t` still counts into `u` when used there (two servers, one store).
        u.count_template(&v1, "gpu", "mutated");
        assert_eq!(
            rendered(&t),
            [
                "p_template_admissions_total{template=\"gpu\",result=\"mutated\"} 3",
                "p_template_admissions_total{template=\"gpu\",result=\"denied\"} 1",
                "p_template_admissions_total{template=\"other\",result=\"unchanged\"} 1",
            ]
        );
        assert_eq!(rendered(&u), ["p_template_admissions_total{template=\"gpu\",result=\"mutated\"} 1"]);
        assert!(Arc::ptr_eq(v1.0.get().unwrap(), v2.0.get().unwrap()), "one series for every version");
    }

    #[test]
    fn counts_from_many_threads_add_up() {
        let t = TemplateAdmissions::default();
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| (0..1000).for_each(|i| t.count(&format!("t{}", i % 10), "mutated", |_| true)));
            }
        });
        let lines = rendered(&t);
        assert_eq!(lines.len(), 10);
        assert!(lines.iter().all(|l| l.ends_with(" 400")), "{lines:?}");
    }
}
