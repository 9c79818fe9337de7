//! rewind beside Ansible, the tool most teams roll back with, in one run on one machine.
//!
//! 50 hosts (`REWIND_BENCH_HOSTS`), each a real `rewind-agent` process managing its own service
//! root (releases v1 and v2, a config file, a restart command, a probe reading the release's
//! health file), connected over mutual TLS to a dev `rewind-coordinator`. For Ansible, an
//! inventory of the same 50 roots over the local connection. The same work per host: switch
//! the `current` link back to v1, restore the config file, run the restart command. rewind also
//! drains and undrains each host, verifies it healthy after the restart and holds a health gate
//! (200 ms, then a report asked of every host) over the wave, journaling every step to disk
//! before and after it acts; Ansible checks nothing.
//!
//! Each repetition (`REWIND_BENCH_ROUNDS`, default 5) puts every host on v2 again (a rewind
//! change plus the deploy tool's config, then adopted) and times `rewindctl rollback start
//! --watch` from its start until it exits; then puts every root on v2 again by hand and times
//! `ansible-playbook` the same way. Wall time of the command a person runs, medians.
//!
//! Run: `cargo bench -p rewind-tests --bench ansible` (needs `ansible-playbook`:
//! `apt-get install ansible-core`).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use rewind_proto::v1 as pb;
use rewind_tests::*;

const FORKS: usize = 50;

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// The playbook doing rewind's work on each root, and an inventory of `hosts` over the local
/// connection; returns the playbook's path.
fn write_ansible(dir: &Path, hosts: &[TestHost]) -> std::path::PathBuf {
    let saved = dir.join("v1-config");
    std::fs::create_dir_all(&saved).unwrap();
    std::fs::write(saved.join("app.toml"), config_for("v1")).unwrap();
    let mut inventory = String::from("[fleet]\n");
    for host in hosts {
        inventory += &format!(
            "{} ansible_connection=local ansible_python_interpreter=/usr/bin/python3 root={}\n",
            host.id,
            host.root.display()
        );
    }
    std::fs::write(dir.join("inventory"), inventory).unwrap();
    std::fs::write(
        dir.join("ansible.cfg"),
        format!(
            "[defaults]\nforks = {FORKS}\nhost_key_checking = False\nretry_files_enabled = False\n"
        ),
    )
    .unwrap();
    let playbook = dir.join("rollback.yml");
    std::fs::write(
        &playbook,
        format!(
            r#"- hosts: fleet
  gather_facts: false
  tasks:
    - name: switch the current link back to v1
      file:
        src: releases/v1
        dest: "{{{{ root }}}}/current"
        state: link
        force: true
    - name: restore the config file
      copy:
        src: "{saved}/app.toml"
        dest: "{{{{ root }}}}/config/app.toml"
    - name: restart
      command: sh -c "echo restarted >> {{{{ root }}}}/restarts"
"#,
            saved = saved.display()
        ),
    )
    .unwrap();
    playbook
}

/// Puts a root where a bad deploy left it: `current` on v2, v2's config.
fn must_be_on_v2_by_hand(host: &TestHost) {
    let current = host.root.join("current");
    let _ = std::fs::remove_file(&current);
    std::os::unix::fs::symlink("releases/v2", &current).unwrap();
    std::fs::write(host.root.join("config/app.toml"), config_for("v2")).unwrap();
}

/// Where a rollback's time went: per step kind, the first start and the last end, and the
/// gate's, in ms from the rollback's start.
fn phases(rollback: &pb::Rollback) -> String {
    let at = |ms: u64| ms.saturating_sub(rollback.started_at_ms);
    let mut phases = Vec::new();
    for kind in ["drain", "restore", "restart", "verify", "undrain"] {
        let steps = rollback.steps.iter().filter(|step| step.kind == kind);
        let first = steps.clone().map(|step| at(step.started_at_ms)).min();
        let last = steps.map(|step| at(step.finished_at_ms)).max();
        if let (Some(first), Some(last)) = (first, last) {
            phases.push(format!("{kind} {first}-{last}"));
        }
    }
    for wave in &rollback.waves {
        phases.push(format!(
            "gate {}-{}",
            at(wave.gate_started_at_ms),
            at(wave.gate_finished_at_ms)
        ));
    }
    format!("{} ms", phases.join(", "))
}

fn main() {
    let count = env_number("REWIND_BENCH_HOSTS", 50);
    let rounds = env_number("REWIND_BENCH_ROUNDS", 5);
    let Ok(version) = Command::new("ansible-playbook").arg("--version").output() else {
        panic!("ansible-playbook is missing: apt-get install ansible-core");
    };
    let version = String::from_utf8_lossy(&version.stdout);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::must_start_with(
        &dir.path().join("coordinator"),
        "[health]\nreport-interval-ms = 2000\n",
    );
    let ids: Vec<String> = (1..=count).map(|n| format!("web-{n:02}")).collect();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    let (hosts, mut client) = runtime.block_on(must_start_hosts(dir.path(), &coordinator, &ids));
    runtime.block_on(must_deploy_v1_then_v2(&mut client, &hosts));
    let playbook = write_ansible(dir.path(), &hosts);
    println!(
        "{count} hosts, {rounds} rounds; {}; rewind: max_parallel {count}, gate settle 200 ms, \
         reports every 2 s; Ansible: forks {FORKS}, no fact gathering, local connection",
        version.lines().next().unwrap_or("ansible")
    );

    let (mut rewind, mut inside_rewind, mut ansible) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        if round > 0 {
            runtime.block_on(async {
                must_deploy_web(&client, "v2", &[]).await;
                must_write_v2_config(&mut client, &hosts).await;
            });
        }
        let change_id = format!("ch-{}", round + 2);
        let parallel = count.to_string();
        let started = Instant::now();
        run_ok(&coordinator.rewindctl(&[
            "rollback",
            "start",
            &change_id,
            "--max-parallel",
            &parallel,
            "--gate-settle-ms",
            "200",
            "--reason",
            "benchmark",
            "--watch",
        ]));
        let took = started.elapsed().as_secs_f64();
        let rollback = runtime.block_on(must_rollback_end(&client, &format!("rb-{}", round + 1)));
        assert_eq!(
            rollback.state,
            pb::RollbackState::Succeeded as i32,
            "{rollback:?}"
        );
        for host in &hosts {
            host.must_be_restored_to_v1();
        }
        rewind.push(took);
        let inside = rollback
            .finished_at_ms
            .saturating_sub(rollback.started_at_ms) as f64
            / 1000.0;
        inside_rewind.push(inside);
        println!("  rewind's phases: {}", phases(&rollback));

        for host in &hosts {
            must_be_on_v2_by_hand(host);
        }
        let started = Instant::now();
        let output = Command::new("ansible-playbook")
            .current_dir(dir.path())
            .env("ANSIBLE_CONFIG", dir.path().join("ansible.cfg"))
            .args(["-i", "inventory"])
            .arg(&playbook)
            .output()
            .expect("run ansible-playbook");
        let took_ansible = started.elapsed().as_secs_f64();
        assert!(
            output.status.success(),
            "ansible-playbook failed:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        for host in &hosts {
            host.must_be_restored_to_v1();
        }
        ansible.push(took_ansible);
        println!(
            "round {}: rewind {took:.2} s ({inside:.2} s from its start to its end as \
             recorded), Ansible {took_ansible:.2} s ({:.1}x)",
            round + 1,
            took_ansible / took
        );
        // Let the agents' drift checks see the roots back on v1 before the next deploy.
        std::thread::sleep(Duration::from_secs(1));
    }
    let (rewind_median, ansible_median) = (median(&mut rewind), median(&mut ansible));
    let inside_median = median(&mut inside_rewind);
    println!(
        "median of {rounds}: rewind {rewind_median:.2} s (min {:.2}, max {:.2}), Ansible \
         {ansible_median:.2} s (min {:.2}, max {:.2}): rewind {:.1}x faster; the rollback \
         as recorded, start to end: {inside_median:.2} s",
        rewind[0],
        rewind[rewind.len() - 1],
        ansible[0],
        ansible[ansible.len() - 1],
        ansible_median / rewind_median
    );
}
