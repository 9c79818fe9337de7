//! What the access check costs each call, on the coordinator's CPU: reading the caller's
//! identity from its certificate (parsing the DER, finding the `rewind://` URI and the groups)
//! and deciding against the policy, for the last binding of a policy of 200 (the worst place),
//! as the gate and a scoped handler do for every `ControlService` call.
//!
//! Run: `cargo bench -p rewind-coordinator --bench access`. Compare with what a write costs (the
//! replicated-writes benchmark: milliseconds).

use std::time::Instant;

use rewind_coordinator::access::{Level, Policy, Principal, Target};
use rewind_shared::dev_ca::{DevCa, Subject};
use rewind_shared::identity::{Kind, peer_identity};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

const CALLS: u32 = 200_000;

fn policy() -> Policy {
    let mut text = String::from(
        "[[binding]]\nname = \"admin\"\nrole = \"admin\"\nidentities = [\"user:root\"]\nscopes = [\"*\"]\n",
    );
    for index in 0..199 {
        let who = if index == 198 {
            "carol".to_string()
        } else {
            format!("user-{index}")
        };
        text += &format!(
            "[[binding]]\nname = \"b{index}\"\nrole = \"operator\"\nidentities = [\"user:{who}\"]\nscopes = [\"staging/*\", \"prod/payments\"]\n"
        );
    }
    Policy::from_toml(&text).expect("the bench policy")
}

fn main() {
    let ca = DevCa::generate("bench CA").unwrap();
    let subject = Subject::new(Kind::User, "carol").with_groups(&["Example Corp", "payments"]);
    let (pem, _) = ca.issue(&subject, &[]).unwrap();
    let certificate = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
    let policy = policy();
    let target = Target::scoped("prod", "payments");

    let started = Instant::now();
    let mut allowed = 0u32;
    for _ in 0..CALLS {
        let identity = peer_identity(std::slice::from_ref(&certificate)).unwrap();
        let principal = Principal {
            kind: identity.kind.unwrap(),
            name: identity.name,
            groups: identity.groups,
        };
        // The gate's coarse check, then the handler's scoped one.
        allowed += u32::from(
            policy
                .decide(&principal, Level::Operate, &Target::Anywhere)
                .allowed,
        );
        allowed += u32::from(policy.decide(&principal, Level::Operate, &target).allowed);
    }
    let elapsed = started.elapsed();
    assert_eq!(allowed, 2 * CALLS);
    println!(
        "access check (identity from the certificate + 2 decisions, 200 bindings): {:.1} µs per call over {CALLS} calls",
        elapsed.as_secs_f64() * 1e6 / f64::from(CALLS)
    );
}
