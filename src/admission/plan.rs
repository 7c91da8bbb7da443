//! What applies to a pod (SPEC §8): its layers found in the store, lowest first, with the
//! warnings and refusals the policy asks for; and how they are recorded.

use std::sync::Arc;

use super::{OnProblem, Policy, Refusal};
use crate::environment::Requested;
use crate::merge::{Conflict, Layer, Role};
use crate::names::Names;
use crate::store::{EntryState, Lookup, TemplateEntry, TemplateStore};
use crate::template::PodTemplate;

/// A layer found in the store, lowest first.
#[derive(Debug, Clone)]
pub struct PlannedLayer {
    pub role: Role,
    pub entry: Arc<TemplateEntry>,
    /// The version served (the last good one when the entry is stale).
    pub template: Arc<PodTemplate>,
}

impl PlannedLayer {
    pub fn layer(&self) -> Layer<'_> {
        Layer { role: self.role, template: &self.template }
    }

    /// `platform default flyte/…`, `namespace default ml/…`, `template ml/…`: for messages and
    /// `render --explain`.
    pub fn describe(&self, platform_namespace: &str) -> String {
        let what = match self.role {
            Role::Named => "template",
            Role::Default if self.entry.source.namespace == platform_namespace => "platform default",
            Role::Default => "namespace default",
        };
        format!("{what} {}", self.entry.source)
    }
}

/// A shadow template (§10) found for one of the pod's layers: evaluated, never applied.
#[derive(Debug, Clone)]
pub struct ShadowLayer {
    pub role: Role,
    pub entry: Arc<TemplateEntry>,
    /// Where it would go among [`Plan::layers`] if its source were enforced.
    pub at: usize,
    /// It would take the place of the layer at `at`: the enforced template it would hide.
    pub replaces: bool,
}

/// What applies to a pod, and what the user should hear about it.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub layers: Vec<PlannedLayer>,
    pub warnings: Vec<String>,
    /// Shadow templates at their place in the order, lowest first.
    pub shadows: Vec<ShadowLayer>,
}

/// The layers for a pod of `namespace` (SPEC §8): the platform default, the namespace default,
/// then the named templates.
pub fn plan(
    namespace: &str,
    requested: &Requested,
    store: &dyn TemplateStore,
    policy: &Policy,
) -> Result<Plan, Refusal> {
    plan_found(namespace, requested, store, policy, &mut Vec::new())
}

/// [`plan`], also telling the template found for each requested name, in order (`None`: no
/// such template): each name looked up once, the names after a refusal too.
pub(super) fn plan_found(
    namespace: &str,
    requested: &Requested,
    store: &dyn TemplateStore,
    policy: &Policy,
    found: &mut Vec<Option<Arc<TemplateEntry>>>,
) -> Result<Plan, Refusal> {
    let planned = plan_into(namespace, requested, store, policy, found);
    if planned.is_err() {
        let rest = requested.names().get(found.len()..).unwrap_or_default();
        found.extend(rest.iter().map(|name| store.lookup(namespace, name).entry));
    }
    planned
}

fn plan_into(
    namespace: &str,
    requested: &Requested,
    store: &dyn TemplateStore,
    policy: &Policy,
    found: &mut Vec<Option<Arc<TemplateEntry>>>,
) -> Result<Plan, Refusal> {
    let mut plan = Plan::default();
    let platform = policy.names.platform_namespace.as_str();
    if let Some(default) = &policy.default_template {
        // Only the platform namespace, then only the pod's own: never another tenant's.
        let platform_default = store.lookup(platform, default).entry;
        let own = |e: &Arc<TemplateEntry>| e.source.namespace == namespace && namespace != platform;
        let namespace_default = store.lookup(namespace, default).entry.filter(own);
        let slots = [
            (platform_default, store.lookup_shadow(platform, default)),
            (namespace_default, store.lookup_shadow(namespace, default).filter(own)),
        ];
        for (entry, shadow) in slots {
            let at = plan.layers.len();
            if let Some(entry) = entry {
                let namespace = entry.source.namespace.clone();
                let how = || format!("the default template (--default-template) in namespace {namespace}");
                plan.add(Role::Default, default, entry, how, policy)?;
            }
            plan.shadow(Role::Default, shadow, at);
        }
    }
    // Messages only: formatted when a refusal or warning needs them, not on every admission.
    let how = || requested.rule(&policy.names);
    let required = requested.required();
    for name in requested.names() {
        let at = plan.layers.len();
        let Lookup { entry, searched } = store.lookup(namespace, name);
        found.push(entry.clone());
        match entry {
            Some(entry) => {
                let how = || format!("named by {}, namespaces searched {searched:?}", how());
                plan.add(Role::Named, name, entry, how, policy)?
            }
            // An environment without a template: nothing to apply.
            None if !required => {}
            None => {
                let message =
                    format!("pod template {name:?} (named by {}) not found in namespaces {searched:?}", how());
                plan.refuse(Refusal::new(policy.on_missing, 404, "NotFound", message))?;
            }
        }
        plan.shadow(Role::Named, store.lookup_shadow(namespace, name), at);
    }
    Ok(plan)
}

impl Plan {
    fn add(
        &mut self,
        role: Role,
        name: &str,
        entry: Arc<TemplateEntry>,
        how: impl FnOnce() -> String,
        policy: &Policy,
    ) -> Result<(), Refusal> {
        let template = match &entry.state {
            EntryState::Ready(t) => t.clone(),
            EntryState::Stale { template, error, broken_version } => {
                self.warnings.push(format!(
                    "pod template {name:?}: {} at version {broken_version} does not parse ({error}); using its last good version {}",
                    entry.source.describe(),
                    entry.source.version
                ));
                template.clone()
            }
            EntryState::Broken(error) => {
                let message =
                    format!("pod template {name:?} ({}): {} does not parse: {error}", how(), entry.source.describe());
                return self.refuse(Refusal::new(policy.on_broken, 422, "Invalid", message));
            }
        };
        self.layers.push(PlannedLayer { role, entry, template });
        Ok(())
    }

    /// Notes the shadow template of the slot whose enforced layer (if any) went in at `at`.
    fn shadow(&mut self, role: Role, entry: Option<Arc<TemplateEntry>>, at: usize) {
        if let Some(entry) = entry {
            let replaces = self.layers.len() > at;
            self.shadows.push(ShadowLayer { role, entry, at, replaces });
        }
    }

    /// A refusal the policy turns into a warning skips the layer; otherwise the pod is denied.
    fn refuse(&mut self, refusal: Refusal) -> Result<(), Refusal> {
        match refusal.on {
            OnProblem::Warn => {
                self.warnings.push(refusal.message);
                Ok(())
            }
            OnProblem::Deny => Err(refusal),
        }
    }
}

/// The applied record (annotation and `auditAnnotations`): every layer lowest first, and the rule
/// that chose the environment when the pod does not name it itself (SPEC §9).
pub fn applied_record(layers: &[PlannedLayer], requested: &Requested, names: &Names) -> String {
    let mut record = layers.iter().map(|l| l.entry.source.to_string()).collect::<Vec<_>>().join(",");
    if let Some(rule) = requested.recorded_rule(names) {
        record.push_str(&rule);
    }
    record
}

/// An applied record read back (`audit`, `explain`): its layers, and the rule suffix
/// (`; environment from task-name …`) or "".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedRecord<'a> {
    pub layers: Vec<&'a str>,
    pub rule: &'a str,
}

impl<'a> AppliedRecord<'a> {
    /// The inverse of [`applied_record`]: template keys, object names and versions never hold
    /// `;` or `,` (ConfigMap keys are `[-._a-zA-Z0-9]+`, versions resourceVersions or hashes).
    pub fn parse(record: &'a str) -> Self {
        let (layers, rule) = record.find("; ").map_or((record, ""), |at| record.split_at(at));
        AppliedRecord { layers: layers.split(',').map(str::trim).filter(|l| !l.is_empty()).collect(), rule }
    }
}

pub(super) fn describe_conflict(c: &Conflict, layers: &[PlannedLayer]) -> String {
    let source = |i: usize| &layers[i].entry.source;
    format!(
        "templates {} and {} both set {}; the later one, {}, wins",
        source(c.lower),
        source(c.higher),
        c.path,
        source(c.higher).key
    )
}
