//! A realistic template (SPEC §3 YAML, ≈ 1 KB): a primary container with ten env vars,
//! resources and two mounts, two volumes, a toleration, a node selector and a pull secret, with
//! labels and annotations. Used by the footprint figure (`benches/allocs.rs`) and by the
//! cluster-scale benchmark (`tests/scale.rs`), so both measure the same templates.

/// The template `key` (0-based) of tenant `tenant`; every one differs in its values.
pub fn realistic_template(tenant: usize, key: usize) -> String {
    let mut env = String::new();
    for i in 0..10 {
        env.push_str(&format!("        - {{name: VAR_{i}, value: \"value-{tenant}-{key}-{i}\"}}\n"));
    }
    format!(
        "primaryContainerName: primary
labels: {{team: team-{tenant}, env: env-{key}}}
annotations: {{cost-center: \"{cost}\", owner: owner-{tenant}@example.com}}
podSpec:
  containers:
    - name: primary
      env:
{env}      resources:
        requests: {{cpu: 500m, memory: 1Gi}}
        limits: {{cpu: \"2\", memory: 4Gi}}
      volumeMounts:
        - {{name: data, mountPath: /data}}
        - {{name: cache, mountPath: /cache}}
  volumes:
    - {{name: data, emptyDir: {{}}}}
    - {{name: cache, emptyDir: {{medium: Memory}}}}
  tolerations:
    - {{key: gpu, operator: Exists, effect: NoSchedule}}
  nodeSelector: {{pool: pool-{key}}}
  imagePullSecrets:
    - {{name: regcred}}
",
        cost = 1000 + tenant
    )
}
