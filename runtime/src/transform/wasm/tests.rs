//! The host against the checked-in `.wat` fixtures: no guest toolchain needed.

use medconnect_api::{ConnectError, Record, Transform};

use super::WasmTransform;
use crate::transform::TransformChain;

fn fixture(name: &str) -> String {
    format!(
        "{}/src/transform/wasm/fixtures/{name}.wat",
        env!("CARGO_MANIFEST_DIR")
    )
}

use medconnect_api::props_from as props;

fn transform(name: &str, extra: &[(&str, &str)]) -> Result<WasmTransform, ConnectError> {
    let mut settings = props(extra);
    settings.insert("module".into(), fixture(name));
    WasmTransform::new(&settings)
}

fn record() -> Record {
    let mut record = Record::new("adt")
        .with_key("MRN1")
        .with_value(r#"{"ssn":"123-45-6789"}"#)
        .with_header("content-type", "application/json")
        .with_timestamp(1_700_000_000_000);
    record.headers.add_null("trace");
    record
}

fn setup_error(result: Result<WasmTransform, ConnectError>) -> (String, String) {
    match result {
        Err(ConnectError::Config { field, reason }) => (field, reason),
        Err(other) => panic!("expected a config error, got {other:?}"),
        Ok(_) => panic!("expected a config error, the module was accepted"),
    }
}

fn record_error(result: Result<Option<Record>, ConnectError>) -> String {
    match result {
        Err(ConnectError::Data(message)) => message.to_string(),
        other => panic!("expected a record (Data) error, got {other:?}"),
    }
}

#[test]
fn identity_returns_the_record_unchanged_call_after_call() {
    let mut identity = transform("identity", &[]).unwrap();
    for _ in 0..3 {
        assert_eq!(identity.apply(record()).unwrap(), Some(record()));
    }
    // A record larger than the guest's initial memory makes `alloc` grow it.
    let big = Record::new("t").with_value(vec![b'x'; 200_000]);
    assert_eq!(identity.apply(big.clone()).unwrap(), Some(big));
}

#[test]
fn drop_and_error_answers_reach_the_engine() {
    assert_eq!(
        transform("drop", &[]).unwrap().apply(record()).unwrap(),
        None
    );
    let message = record_error(transform("error", &[]).unwrap().apply(record()));
    assert!(message.contains("no MRN in record"), "{message}");
}

#[test]
fn an_endless_loop_fails_the_record_with_the_time_limit() {
    let mut looping = transform("infinite-loop", &[("timeout.ms", "50")]).unwrap();
    let message = record_error(looping.apply(record()));
    assert!(message.contains("time limit of 50 ms"), "{message}");
    // The next record gets a fresh instance and the same verdict, not a hang or a panic.
    assert!(record_error(looping.apply(record())).contains("time limit"));
}

#[test]
fn unbounded_memory_growth_fails_the_record_with_the_memory_limit() {
    let mut bomb = transform("memory-bomb", &[("memory.max.bytes", "1048576")]).unwrap();
    let message = record_error(bomb.apply(record()));
    assert!(
        message.contains("memory limit of 1048576 bytes"),
        "{message}"
    );
}

#[test]
fn a_trap_fails_only_its_record_and_the_instance_is_rebuilt() {
    let mut trap = transform("trap", &[]).unwrap();
    assert_eq!(trap.apply(record()).unwrap(), Some(record()));
    let poison = Record::new("adt").with_value("boom!");
    let message = record_error(trap.apply(poison));
    assert!(
        message.contains("trapped") && message.contains("unreachable"),
        "{message}"
    );
    assert_eq!(trap.apply(record()).unwrap(), Some(record()));
}

#[test]
fn the_trap_fixture_looks_only_at_the_value() {
    // 0x21 is '!': end-to-end tests send records with real timestamps and must not see a
    // healthy record trap because a timestamp or length byte happens to be 0x21.
    let mut trap = transform("trap", &[]).unwrap();
    let innocent = Record::new("t!")
        .with_key("MRN!")
        .with_value(vec![b'x'; 0x21])
        .with_header("h!", "v!")
        .with_timestamp(0x2121_2121_2121);
    assert_eq!(trap.apply(innocent.clone()).unwrap(), Some(innocent));
    assert!(record_error(trap.apply(Record::new("t").with_value("!"))).contains("unreachable"));
}

#[test]
fn an_answer_outside_guest_memory_or_garbled_fails_the_record() {
    let dir = tempfile::tempdir().unwrap();
    let identity = std::fs::read_to_string(fixture("identity")).unwrap();
    let echo = "(call $echo (local.get 0) (local.get 1))))";
    for (name, body, expected) in [
        ("huge", "(i64.const 0xFFFFFFFF)))", "outside guest memory"),
        // Answers the byte at address 0 after setting it to 7, a status that does not exist.
        (
            "garbled",
            "(i32.store8 (i32.const 0) (i32.const 7)) (i64.const 1)))",
            "unknown status byte 7",
        ),
    ] {
        let path = dir.path().join(format!("{name}.wat"));
        std::fs::write(&path, identity.replace(echo, body)).unwrap();
        let mut guest = WasmTransform::new(&props(&[("module", path.to_str().unwrap())])).unwrap();
        let message = record_error(guest.apply(record()));
        assert!(
            message.contains("broke the ABI") && message.contains(expected),
            "{name}: {message}"
        );
    }
}

#[test]
fn without_a_time_limit_guests_still_run() {
    let mut identity = transform("identity", &[("timeout.ms", "0")]).unwrap();
    assert_eq!(identity.apply(record()).unwrap(), Some(record()));
}

#[test]
fn a_wrong_abi_version_is_refused_on_the_module_setting() {
    let (field, reason) = setup_error(transform("wrong-abi", &[]));
    assert_eq!(field, "module");
    assert!(
        reason.contains("ABI version 99") && reason.contains("version 1"),
        "{reason}"
    );
}

#[test]
fn a_module_with_imports_is_refused_on_the_module_setting() {
    let (field, reason) = setup_error(transform("imports-wasi", &[]));
    assert_eq!(field, "module");
    assert!(
        reason.contains("wasi_snapshot_preview1.fd_write") && reason.contains("no WASI"),
        "{reason}"
    );
}

#[test]
fn a_missing_or_broken_module_is_refused_on_the_module_setting() {
    let (field, reason) = setup_error(transform("no-such-module", &[]));
    assert_eq!(field, "module");
    assert!(reason.contains("cannot read"), "{reason}");

    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.wasm");
    std::fs::write(&garbage, b"\0asm not really").unwrap();
    let (field, reason) = setup_error(WasmTransform::new(&props(&[(
        "module",
        garbage.to_str().unwrap(),
    )])));
    assert_eq!(field, "module");
    assert!(
        reason.contains("not a valid WebAssembly module"),
        "{reason}"
    );

    let exportless = dir.path().join("exportless.wat");
    std::fs::write(&exportless, r#"(module (memory (export "memory") 1))"#).unwrap();
    let (_, reason) = setup_error(WasmTransform::new(&props(&[(
        "module",
        exportless.to_str().unwrap(),
    )])));
    assert!(reason.contains("medconnect_abi_version"), "{reason}");
}

#[test]
fn a_module_whose_initial_memory_exceeds_the_limit_is_refused_up_front() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.wat");
    let identity = std::fs::read_to_string(fixture("identity")).unwrap();
    // 100 pages (6.4 MiB) of initial memory against a 1 MiB limit.
    std::fs::write(
        &path,
        identity.replace(
            "(memory (export \"memory\") 1)",
            "(memory (export \"memory\") 100)",
        ),
    )
    .unwrap();
    let (field, reason) = setup_error(WasmTransform::new(&props(&[
        ("module", path.to_str().unwrap()),
        ("memory.max.bytes", "1048576"),
    ])));
    assert_eq!(field, "module");
    assert!(reason.contains("memory limit of 1048576 bytes"), "{reason}");
}

#[test]
fn configuration_reaches_the_guest_which_may_refuse_it() {
    assert!(transform("strict-config", &[]).is_ok());
    let (field, reason) = setup_error(transform("strict-config", &[("config.colour", "blue")]));
    assert_eq!(field, "config");
    assert!(reason.contains("unknown setting"), "{reason}");
}

#[test]
fn a_changed_file_is_compiled_again_and_an_unchanged_one_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.wat");
    std::fs::copy(fixture("identity"), &path).unwrap();
    let first = super::host::load(&path, true).unwrap();
    let again = super::host::load(&path, true).unwrap();
    assert!(std::sync::Arc::ptr_eq(&first, &again));
    std::fs::copy(fixture("drop"), &path).unwrap();
    let mut changed = WasmTransform::new(&props(&[("module", path.to_str().unwrap())])).unwrap();
    assert_eq!(changed.apply(record()).unwrap(), None);
}

#[test]
fn validation_reports_module_problems_on_the_module_field() {
    let values = TransformChain::validate(&props(&[
        ("transforms", "mask"),
        ("transforms.mask.type", "wasm"),
        ("transforms.mask.module", &fixture("wrong-abi")),
    ]));
    let errors = |name: &str| {
        values
            .iter()
            .find(|v| v.name == name)
            .map(|v| v.errors.clone())
            .unwrap_or_else(|| panic!("no entry for {name}: {values:?}"))
    };
    assert!(
        errors("transforms.mask.module")
            .iter()
            .any(|e| e.contains("ABI version 99")),
        "{values:?}"
    );
    assert!(errors("transforms.mask.type").is_empty(), "{values:?}");

    let values = TransformChain::validate(&props(&[
        ("transforms", "mask"),
        ("transforms.mask.type", "wasm"),
    ]));
    let module = values
        .iter()
        .find(|v| v.name == "transforms.mask.module")
        .unwrap();
    assert_eq!(
        module.errors.len(),
        1,
        "one clear error for a missing setting: {values:?}"
    );

    let error = TransformChain::from_config(&props(&[
        ("transforms", "mask"),
        ("transforms.mask.type", "io.medconnect.transforms.Wasm"),
        ("transforms.mask.module", &fixture("imports-wasi")),
    ]))
    .err()
    .unwrap();
    assert!(
        matches!(error, ConnectError::Config { ref field, .. } if field == "transforms.mask.module"),
        "{error:?}"
    );
}

#[test]
fn a_wasm_stage_runs_in_a_chain_after_a_native_one() {
    let mut chain = TransformChain::from_config(&props(&[
        ("transforms", "tag,echo"),
        ("transforms.tag.type", "InsertField$Value"),
        ("transforms.tag.static.field", "ward"),
        ("transforms.tag.static.value", "icu"),
        ("transforms.echo.type", "wasm"),
        ("transforms.echo.module", &fixture("identity")),
    ]))
    .unwrap();
    let out = chain
        .apply(Record::new("t").with_value("{}"))
        .unwrap()
        .unwrap();
    assert_eq!(out.value.as_deref(), Some(&br#"{"ward":"icu"}"#[..]));
}
