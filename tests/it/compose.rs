//! docker-compose.yml against the CLI: every service's command is a real hepaflow command
//! line, every setting it passes is one hepaflow reads, and the stack has its parts.

use crate::support::{hepaflow, root, stderr};

/// (service, command) pairs of the `services:` section; commands are one-line JSON arrays.
fn services(text: &str) -> Vec<(String, Option<Vec<String>>)> {
    let mut out: Vec<(String, Option<Vec<String>>)> = Vec::new();
    let mut in_services = false;
    for line in text.lines() {
        if !line.starts_with(' ') && !line.trim().is_empty() && !line.starts_with('#') {
            in_services = line.trim_end() == "services:";
            continue;
        }
        if !in_services {
            continue;
        }
        if let Some(name) = line.strip_prefix("  ").and_then(|l| l.strip_suffix(':'))
            && !name.starts_with(' ')
        {
            out.push((name.to_string(), None));
        } else if let Some(cmd) = line.trim().strip_prefix("command: ") {
            let args: Vec<String> = serde_json::from_str(cmd).expect("command is a JSON array");
            out.last_mut().expect("command inside a service").1 = Some(args);
        }
    }
    out
}

#[test]
fn compose_services_run_real_commands() {
    let text = std::fs::read_to_string(root().join("docker-compose.yml")).unwrap();
    let svcs = services(&text);
    let names: Vec<&str> = svcs.iter().map(|(n, _)| n.as_str()).collect();
    for want in [
        "postgres",
        "mailpit",
        "migrate",
        "scheduler",
        "worker-cpu",
        "worker-gpu",
        "web",
    ] {
        assert!(names.contains(&want), "service {want} missing: {names:?}");
    }
    let mut checked = 0;
    for (name, cmd) in &svcs {
        let Some(args) = cmd else { continue };
        // `--help` after the arguments: clap rejects unknown subcommands and flags first.
        let out = hepaflow().args(args).arg("--help").output().unwrap();
        assert!(
            out.status.success(),
            "service {name}: `hepaflow {}`: {}",
            args.join(" "),
            stderr(&out)
        );
        checked += 1;
    }
    assert!(checked >= 4);
    let gpu = &svcs.iter().find(|(n, _)| n == "worker-gpu").unwrap().1;
    assert!(gpu.as_ref().unwrap().join(" ").contains("--queues gpu"));
    assert!(text.contains("driver: nvidia") && text.contains("capabilities: [gpu]"));
    let web = &svcs.iter().find(|(n, _)| n == "web").unwrap().1;
    assert_eq!(web.as_ref().unwrap()[0], "serve");
    assert!(
        text.contains("/healthz"),
        "the web service has a health check"
    );
    // Every hepaflow setting the stack passes is one the code reads.
    let config = ["src/config.rs", "src/cli/mod.rs"]
        .map(|f| std::fs::read_to_string(root().join(f)).unwrap())
        .join("\n");
    for word in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if word.starts_with("HEPAFLOW_") || word == "DATABASE_URL" {
            assert!(
                config.contains(word),
                "{word} is not a setting hepaflow reads"
            );
        }
    }
}
