//! Engines, the compiled-module cache and guest instances.
//!
//! One engine per process (two if some transform disables the time limit: epoch checks are
//! compiled into the code, so the same module cannot run with and without them). A module
//! file is compiled once per (path, size, mtime); each task holds one instance, reused across
//! records and rebuilt from the cached `InstancePre` after a trap, because a trapped instance's
//! memory may be half-written.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::time::SystemTime;

use medconnect_api::Props;
use wasmtime::{
    Config, Engine, ExternType, InstanceAllocationStrategy, InstancePre, Linker, Memory, Module,
    OptLevel, PoolingAllocationConfig, Store, Trap, TypedFunc, ValType,
};

use super::abi::{
    self, EXPORT_ALLOC, EXPORT_CONFIGURE, EXPORT_MEMORY, EXPORT_TRANSFORM, EXPORT_VERSION,
};
use super::error::WasmError;
use super::limits::{self, GuestLimiter, Limits};

/// Guest instances that may exist at once per engine (one per task using a WASM transform,
/// plus short-lived ones while validating). Each reserves address space, not memory.
const POOL_INSTANCES: u32 = 256;

fn build_engine(epoch: bool) -> Result<Engine, String> {
    let mut pool = PoolingAllocationConfig::default();
    pool.total_core_instances(POOL_INSTANCES)
        .total_memories(POOL_INSTANCES)
        .total_tables(POOL_INSTANCES)
        .max_memory_size(limits::MAX_MEMORY_BYTES as usize);
    let mut config = Config::new();
    config
        .cranelift_opt_level(OptLevel::Speed)
        .epoch_interruption(epoch)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    let engine = Engine::new(&config).map_err(|e| format!("{e:#}"))?;
    if epoch {
        limits::start_ticker(&engine);
    }
    Ok(engine)
}

fn engine(epoch: bool) -> Result<Engine, WasmError> {
    static WITH_DEADLINE: LazyLock<Result<Engine, String>> = LazyLock::new(|| build_engine(true));
    static WITHOUT_DEADLINE: LazyLock<Result<Engine, String>> =
        LazyLock::new(|| build_engine(false));
    let engine = if epoch {
        &*WITH_DEADLINE
    } else {
        &*WITHOUT_DEADLINE
    };
    engine.clone().map_err(WasmError::Engine)
}

/// A compiled, checked module, ready to instantiate.
pub struct LoadedModule {
    path: PathBuf,
    pre: InstancePre<GuestState>,
    has_configure: bool,
    epoch: bool,
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct CacheKey {
    path: PathBuf,
    len: u64,
    modified: Option<SystemTime>,
    epoch: bool,
}

static CACHE: LazyLock<Mutex<HashMap<CacheKey, Arc<LoadedModule>>>> =
    LazyLock::new(Default::default);

/// Loads `path` (binary `.wasm`, or `.wat` text), compiling it unless the same file version was
/// compiled before, and checks it against the ABI's import and export rules.
pub fn load(path: &Path, epoch: bool) -> Result<Arc<LoadedModule>, WasmError> {
    let display = path.display().to_string();
    let meta = std::fs::metadata(path).map_err(|source| WasmError::Read {
        path: display.clone(),
        source,
    })?;
    let key = CacheKey {
        path: path.to_path_buf(),
        len: meta.len(),
        modified: meta.modified().ok(),
        epoch,
    };
    if let Some(hit) = CACHE
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(&key)
    {
        return Ok(hit.clone());
    }
    let bytes = std::fs::read(path).map_err(|source| WasmError::Read {
        path: display.clone(),
        source,
    })?;
    let started = std::time::Instant::now();
    // Compiling holds no lock: two tasks may compile the same file once each, which is
    // cheaper than making every other module wait.
    let module = Module::new(&engine(epoch)?, &bytes).map_err(|e| WasmError::Compile {
        path: display.clone(),
        message: format!("{e:#}"),
    })?;
    let loaded = Arc::new(check(module, path, epoch)?);
    tracing::info!(module = %path.display(), elapsed_ms = started.elapsed().as_millis() as u64, "compiled WASM transform");
    let mut cache = CACHE.lock().unwrap_or_else(PoisonError::into_inner);
    cache.retain(|k, _| k.path != key.path || k.epoch != key.epoch);
    cache.insert(key, loaded.clone());
    Ok(loaded)
}

fn check(module: Module, path: &Path, epoch: bool) -> Result<LoadedModule, WasmError> {
    let display = path.display().to_string();
    if let Some(import) = module.imports().next() {
        return Err(WasmError::Import {
            path: display,
            import: format!("{}.{}", import.module(), import.name()),
        });
    }
    let missing = |name: &str, wanted: &str| WasmError::Export {
        path: display.clone(),
        name: name.to_string(),
        wanted: wanted.to_string(),
    };
    let func = |name: &str,
                params: &[ValType],
                results: &[ValType],
                wanted: &str|
     -> Result<bool, WasmError> {
        match module.get_export(name) {
            None => Ok(false),
            Some(ExternType::Func(ty))
                if ty
                    .params()
                    .map(|p| p.to_string())
                    .eq(params.iter().map(ValType::to_string))
                    && ty
                        .results()
                        .map(|p| p.to_string())
                        .eq(results.iter().map(ValType::to_string)) =>
            {
                Ok(true)
            }
            Some(_) => Err(missing(name, wanted)),
        }
    };
    use ValType::{I32, I64};
    if !matches!(
        module.get_export(EXPORT_MEMORY),
        Some(ExternType::Memory(_))
    ) {
        return Err(missing(EXPORT_MEMORY, "a memory"));
    }
    let required = [
        (EXPORT_VERSION, &[][..], &[I32][..], "a function () -> i32"),
        (
            EXPORT_ALLOC,
            &[I32][..],
            &[I32][..],
            "a function (i32) -> i32",
        ),
        (
            EXPORT_TRANSFORM,
            &[I32, I32][..],
            &[I64][..],
            "a function (i32, i32) -> i64",
        ),
    ];
    for (name, params, results, wanted) in required {
        if !func(name, params, results, wanted)? {
            return Err(missing(name, wanted));
        }
    }
    let has_configure = func(
        EXPORT_CONFIGURE,
        &[I32, I32],
        &[I64],
        "a function (i32, i32) -> i64",
    )?;
    let pre = Linker::new(module.engine())
        .instantiate_pre(&module)
        .map_err(|e| WasmError::Compile {
            path: display,
            message: format!("{e:#}"),
        })?;
    Ok(LoadedModule {
        path: path.to_path_buf(),
        pre,
        has_configure,
        epoch,
    })
}

pub struct GuestState {
    limiter: GuestLimiter,
}

struct Live {
    store: Store<GuestState>,
    memory: Memory,
    alloc: TypedFunc<i32, i32>,
    transform: TypedFunc<(i32, i32), i64>,
}

/// One task's guest: a live instance, or none after a trap until the next call rebuilds it.
pub struct Guest {
    module: Arc<LoadedModule>,
    limits: Limits,
    config: Vec<u8>,
    live: Option<Live>,
}

impl Guest {
    /// Instantiates, checks the ABI version and passes the configuration: every way a module
    /// can be unusable shows here, at validation, rather than at the first record.
    pub fn new(
        module: Arc<LoadedModule>,
        limits: Limits,
        config: &Props,
    ) -> Result<Self, WasmError> {
        let mut guest = Self {
            module,
            limits,
            config: abi::encode_config(config),
            live: None,
        };
        guest.live = Some(guest.instantiate()?);
        Ok(guest)
    }

    /// Runs `medconnect_transform` on an encoded record and returns the guest's answer bytes.
    /// Any failure discards the instance; the next call starts from a fresh one.
    pub fn call(&mut self, input: &[u8]) -> Result<Vec<u8>, WasmError> {
        let mut live = match self.live.take() {
            Some(live) => live,
            None => self.instantiate()?,
        };
        let transform = live.transform.clone();
        let answer = self.invoke(&mut live, transform, input)?;
        self.live = Some(live);
        Ok(answer)
    }

    fn instantiate(&self) -> Result<Live, WasmError> {
        let engine = self.module.pre.module().engine();
        let mut store = Store::new(
            engine,
            GuestState {
                limiter: GuestLimiter::new(&self.limits),
            },
        );
        store.limiter(|state| &mut state.limiter);
        if self.module.epoch {
            // A start function runs under the same deadline as a call.
            self.arm(&mut store);
        }
        let path = self.module.path.display().to_string();
        let instance = self.module.pre.instantiate(&mut store).map_err(|e| {
            if e.is::<Trap>() || store.data().limiter.exceeded {
                self.fault(&store, e)
            } else {
                // Not the guest's doing: the instance pool is full, or the OS refused memory.
                WasmError::Instantiate {
                    path: path.clone(),
                    message: format!("{e:#}"),
                }
            }
        })?;
        let export_error = |e: wasmtime::Error| WasmError::Instantiate {
            path: path.clone(),
            message: format!("{e:#}"),
        };
        let memory = instance
            .get_memory(&mut store, EXPORT_MEMORY)
            .ok_or_else(|| export_error(wasmtime::Error::msg("no memory export")))?;
        let version = instance
            .get_typed_func::<(), i32>(&mut store, EXPORT_VERSION)
            .map_err(export_error)?;
        let alloc = instance
            .get_typed_func(&mut store, EXPORT_ALLOC)
            .map_err(export_error)?;
        let transform = instance
            .get_typed_func(&mut store, EXPORT_TRANSFORM)
            .map_err(export_error)?;
        self.arm(&mut store);
        let found = version
            .call(&mut store, ())
            .map_err(|e| self.fault(&store, e))?;
        if found != abi::ABI_VERSION {
            return Err(WasmError::AbiVersion {
                path,
                found,
                expected: abi::ABI_VERSION,
            });
        }
        let mut live = Live {
            store,
            memory,
            alloc,
            transform,
        };
        if self.module.has_configure {
            let configure = instance
                .get_typed_func::<(i32, i32), i64>(&mut live.store, EXPORT_CONFIGURE)
                .map_err(export_error)?;
            let answer = self.invoke(&mut live, configure, &self.config)?;
            match abi::decode_configured(&answer) {
                Ok(None) => {}
                Ok(Some(message)) => return Err(WasmError::Configure(message)),
                Err(malformed) => return Err(WasmError::Protocol(malformed.0)),
            }
        }
        Ok(live)
    }

    fn arm(&self, store: &mut Store<GuestState>) {
        if let Some(ticks) = self.limits.deadline_ticks() {
            store.set_epoch_deadline(ticks);
        }
    }

    /// Copies `input` into guest memory through `alloc`, calls `func`, copies the answer out.
    fn invoke(
        &self,
        live: &mut Live,
        func: TypedFunc<(i32, i32), i64>,
        input: &[u8],
    ) -> Result<Vec<u8>, WasmError> {
        let len = i32::try_from(input.len())
            .map_err(|_| WasmError::Protocol("record larger than 2 GiB".into()))?;
        self.arm(&mut live.store);
        let ptr = live
            .alloc
            .call(&mut live.store, len)
            .map_err(|e| self.fault(&live.store, e))?;
        live.memory
            .write(&mut live.store, ptr as u32 as usize, input)
            .map_err(|_| {
                WasmError::Protocol(format!("alloc({len}) returned {ptr}, outside guest memory"))
            })?;
        let packed = func
            .call(&mut live.store, (ptr, len))
            .map_err(|e| self.fault(&live.store, e))?;
        let (out_ptr, out_len) = abi::unpack(packed);
        // Bounds first: the length is the guest's word, and must not size a host allocation.
        let start = out_ptr as usize;
        live.memory
            .data(&live.store)
            .get(start..start.saturating_add(out_len as usize))
            .map(<[u8]>::to_vec)
            .ok_or_else(|| {
                WasmError::Protocol(format!(
                    "answer at {out_ptr}+{out_len} lies outside guest memory"
                ))
            })
    }

    /// Names the cause of a failed call: time limit, memory limit, or the guest's own trap.
    fn fault(&self, store: &Store<GuestState>, error: wasmtime::Error) -> WasmError {
        if store.data().limiter.exceeded {
            return WasmError::Memory(self.limits.memory_bytes);
        }
        match error.downcast_ref::<Trap>() {
            Some(Trap::Interrupt) => {
                WasmError::Timeout(self.limits.timeout.map_or(0, |t| t.as_millis() as u64))
            }
            Some(trap) => {
                let text = trap.to_string();
                WasmError::Trap(
                    text.strip_prefix("wasm trap: ")
                        .unwrap_or(&text)
                        .to_string(),
                )
            }
            None => WasmError::Trap(format!("{error:#}")),
        }
    }
}
