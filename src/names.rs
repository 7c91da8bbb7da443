//! The configurable names of SPEC §2, shared by the store and the admission logic.

/// Label and annotation names, and the platform namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    /// Pod label naming the environment; its value is the template name.
    pub environment_label: String,
    /// Pod annotation naming a template explicitly; wins over the label.
    pub template_annotation: String,
    /// Label (`"true"`) that marks a ConfigMap as a template source.
    pub source_label: String,
    /// Annotation written on mutated pods: `<namespace>/<configmap>/<key>@<version>`.
    pub applied_annotation: String,
    /// Namespace whose templates every pod may use.
    pub platform_namespace: String,
}

impl Default for Names {
    fn default() -> Self {
        Names {
            environment_label: "flyte.org/environment".into(),
            template_annotation: "flyte.org/pod-template".into(),
            source_label: "flyte.org/pod-templates".into(),
            applied_annotation: "flyte.org/pod-template-applied".into(),
            platform_namespace: "flyte".into(),
        }
    }
}
