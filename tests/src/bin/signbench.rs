//! muster-signbench: what signed jobs cost, with the code the CLI, the server and the agent
//! use. Signing N agents (the CLI: Merkle root + one ed25519 signature), the server's proofs
//! for every run, one agent's check (root from its proof + one verification), and the bytes a
//! proof adds to each `run`. `muster-signbench 10000 19000` (release build; docs/benchmarks.md).

#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

use ring::signature::{Ed25519KeyPair, KeyPair};
use shared::job::{CommandSpec, Program};
use shared::signing::{AgentSet, PublicKey, RunSignature, Signature, job_statement};
use shared::{AgentId, Timestamp};

fn main() {
    let sizes: Vec<usize> = std::env::args().skip(1).map(|a| a.parse().expect("a number of agents")).collect();
    let sizes = if sizes.is_empty() { vec![10_000, 19_000] } else { sizes };
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).unwrap();
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
    let public = PublicKey::from_bytes(pair.public_key().as_ref().try_into().unwrap());
    let command =
        CommandSpec { program: Program::Shell("uptime".into()), cwd: None, env: Default::default(), secret_env: Default::default() };
    let job = "0123456789abcdef0123456789abcdef";
    let expires = Timestamp::now();
    println!("agents  sign_ms  proofs_all_ms  proof_us_each  verify_us  proof_bytes");
    for n in sizes {
        let ids: Vec<AgentId> =
            (0..n).map(|i| AgentId::parse(&format!("{:016x}", (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15))).unwrap()).collect();
        // The CLI: build the set, sign once.
        let t = Instant::now();
        let set = AgentSet::new(&ids);
        let statement = job_statement(job, &command, &set.root(), set.len(), expires, None);
        let signature = Signature(pair.sign(&statement).as_ref().try_into().unwrap());
        let sign_ms = t.elapsed().as_secs_f64() * 1e3;
        // The server: one proof per run (the set is built once per job and cached).
        let t = Instant::now();
        let proofs: Vec<Vec<String>> = ids.iter().map(|id| set.proof(id).unwrap()).collect();
        let proofs_ms = t.elapsed().as_secs_f64() * 1e3;
        // An agent: root from its proof, then one ed25519 verification. Averaged over 1000.
        let rounds = 1000.min(n);
        let t = Instant::now();
        for (id, proof) in ids.iter().zip(&proofs).take(rounds) {
            let run = RunSignature {
                key: public.clone(),
                signature: signature.clone(),
                expires_at: expires,
                selector: None,
                agents: n as u64,
                proof: proof.clone(),
            };
            run.verify(job, &command, id).unwrap();
        }
        let verify_us = t.elapsed().as_secs_f64() * 1e6 / rounds as f64;
        let sample = RunSignature {
            key: public.clone(),
            signature: signature.clone(),
            expires_at: expires,
            selector: None,
            agents: n as u64,
            proof: proofs[0].clone(),
        };
        let bytes = serde_json::to_string(&sample).unwrap().len();
        println!("{n:>6}  {sign_ms:>7.1}  {proofs_ms:>13.1}  {:>13.2}  {verify_us:>9.1}  {bytes:>11}", proofs_ms * 1e3 / n as f64);
    }
}
