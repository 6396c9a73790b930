//! The same transform natively and as WASM: mask two fields of a ~300-byte JSON record.
//!
//!   scripts/build-plugins && cargo run -p medconnect-bench --bin transforms -- [records]
//!
//! Native: Connect's `MaskField$Value` (serde_json) with `replacement=***`. WASM: the
//! `mask-phi` example guest (plugins/examples) with the same fields, once with the default
//! time limit (epoch interruption) and once with `timeout.ms=0`. Each runs through a
//! `TransformChain` built from a connector config, as a task runs it. Outputs are checked
//! equal first; runs are alternated and repeated, the best of each is kept. Prints records/s,
//! the WASM/native ratios and the cost of the time limit.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, bail};
use medconnect_api::{Props, Record};
use medconnect_runtime::transform::TransformChain;

const ROUNDS: usize = 5;

fn record(seq: usize) -> Record {
    let value = format!(
        concat!(
            r#"{{"resourceType":"Patient","id":"pat-{seq:06}","mrn":"MRN{seq:08}","ssn":"123-45-{ssn:04}","#,
            r#""name":{{"family":"Doe","given":"Jane"}},"birthDate":"1980-01-{day:02}","gender":"female","#,
            r#""address":{{"line":"1 Main St","city":"Boston","state":"MA","postalCode":"02110"}},"#,
            r#""telecom":"555-0100","ward":"ICU","bed":"101-A","admitted":"2024-01-01T12:00:00Z","hr":72}}"#
        ),
        seq = seq,
        ssn = seq % 10_000,
        day = seq % 28 + 1
    );
    Record::new("patients")
        .with_key(format!("MRN{seq:08}"))
        .with_value(value)
        .with_header("content-type", "application/json")
}

fn chain(pairs: &[(&str, &str)]) -> anyhow::Result<TransformChain> {
    let props: Props = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Ok(TransformChain::from_config(&props)?)
}

/// Records per second for one pass over the dataset.
fn run(chain: &mut TransformChain, records: &[Record]) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut bytes = 0usize;
    for record in records {
        match chain.apply(record.clone()) {
            Ok(Some(out)) => bytes += out.value.map_or(0, |v| v.len()),
            Ok(None) => bail!("the record was dropped"),
            Err(failure) => bail!("the transform failed: {}", failure.error),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    std::hint::black_box(bytes);
    Ok(records.len() as f64 / elapsed)
}

fn main() -> anyhow::Result<()> {
    let count: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()
        .context("records must be a number")?
        .unwrap_or(200_000);
    let module = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/examples/mask-phi.wasm");
    if !module.is_file() {
        bail!(
            "{} is missing: run scripts/build-plugins first",
            module.display()
        );
    }
    let module = module.to_string_lossy().into_owned();
    let records: Vec<Record> = (0..count).map(record).collect();
    let average = records
        .iter()
        .map(|r| r.value.as_ref().map_or(0, |v| v.len()))
        .sum::<usize>()
        / count.max(1);

    let mut native = chain(&[
        ("transforms", "mask"),
        ("transforms.mask.type", "MaskField$Value"),
        ("transforms.mask.fields", "ssn,birthDate"),
        ("transforms.mask.replacement", "***"),
    ])?;
    let wasm_config = |timeout: &'static str| {
        chain(&[
            ("transforms", "mask"),
            ("transforms.mask.type", "wasm"),
            ("transforms.mask.module", &module),
            ("transforms.mask.config.fields", "ssn,birthDate"),
            ("transforms.mask.timeout.ms", timeout),
        ])
    };
    let mut limited = wasm_config("250")?;
    let mut unlimited = wasm_config("0")?;

    // Same work: the outputs must agree field for field.
    for record in records.iter().take(100) {
        let outputs = [&mut native, &mut limited, &mut unlimited].map(|c| {
            c.apply(record.clone())
                .ok()
                .flatten()
                .and_then(|r| r.value)
                .and_then(|v| serde_json::from_slice::<serde_json::Value>(&v).ok())
        });
        if outputs[0].is_none() || outputs[0] != outputs[1] || outputs[0] != outputs[2] {
            bail!("native and WASM disagree: {outputs:?}");
        }
    }

    let (mut best_native, mut best_limited, mut best_unlimited) = (0f64, 0f64, 0f64);
    for _ in 0..ROUNDS {
        best_native = best_native.max(run(&mut native, &records)?);
        best_limited = best_limited.max(run(&mut limited, &records)?);
        best_unlimited = best_unlimited.max(run(&mut unlimited, &records)?);
    }
    println!(
        "mask 2 fields of a {average}-byte JSON record, {count} records, best of {ROUNDS} rounds"
    );
    println!("  native MaskField$Value        {best_native:>12.0} records/s");
    println!(
        "  WASM mask-phi, time limit on  {best_limited:>12.0} records/s  ({:.2} of native)",
        best_limited / best_native
    );
    println!(
        "  WASM mask-phi, time limit off {best_unlimited:>12.0} records/s  ({:.2} of native)",
        best_unlimited / best_native
    );
    println!(
        "  time limit (epoch checks) costs {:.1}%",
        (1.0 - best_limited / best_unlimited) * 100.0
    );
    Ok(())
}
