//! Reporting a bad routing index without synchronising: the routing kernels clamp it (nothing is
//! read out of bounds) and write error words. Each run has the scan kernel write them straight
//! into a slot of mapped pinned host memory owned by the kernel object (no copy on the stream after
//! the kernels), and records an event behind its launches; the next run queries the event
//! (non-blocking) and fails if an earlier run saw a bad index. `SCATTERMOE_CUDA_SYNC_CHECKS=1`
//! instead synchronises after the launches and fails the run itself, with the contract's message
//! (value included). See docs/op-spec.md.

use super::driver::{self, CuResult};
use crate::spec::IndexType;
use cudarc::driver::sys::{self, CUcontext, CUdeviceptr, CUevent, CUresult, CUstream};

/// The environment variable that turns on synchronous checks.
pub const SYNC_CHECKS_ENV: &str = "SCATTERMOE_CUDA_SYNC_CHECKS";

/// Whether `SCATTERMOE_CUDA_SYNC_CHECKS=1` is set.
pub fn sync_checks_requested() -> bool {
    std::env::var(SYNC_CHECKS_ENV).is_ok_and(|v| v.trim() == "1")
}

/// What a run's error words are checked against: its routing indices as the routing kernels read them.
pub struct CheckInfo {
    pub it: IndexType,
    pub routing_indices: CUdeviceptr,
    pub k: usize,
    pub experts: usize,
}

/// The checks of one kernel object (an ONNX Runtime CUDA kernel, a TensorRT plugin) around each of
/// its runs: asynchronous ([`AsyncChecks`]) by default, synchronous with `SCATTERMOE_CUDA_SYNC_CHECKS=1`,
/// none while the stream is being captured into a CUDA graph (a replay does not call us).
/// Call [`before`](Self::before) ahead of the run's launches and [`after`](Self::after) behind them.
pub struct RunChecks {
    sync: bool,
    checks: Option<AsyncChecks>,
}

impl Default for RunChecks {
    fn default() -> Self {
        RunChecks { sync: sync_checks_requested(), checks: None }
    }
}

impl RunChecks {
    /// Fails if an earlier run saw a bad index (never waits), then picks where this run's routing
    /// kernels write their error words: a free slot of mapped host memory (index and device address),
    /// or None (their workspace: sync checks, capture, or every slot still in flight). `ctx`: the
    /// stream's context, current.
    pub fn before(&mut self, op: &'static str, ctx: CUcontext, capturing: bool) -> Result<Option<(usize, CUdeviceptr)>, String> {
        if self.sync || capturing {
            return Ok(None);
        }
        if self.checks.as_ref().is_some_and(|c| c.context() != ctx) {
            self.checks = None;
        }
        if self.checks.is_none() {
            self.checks = Some(AsyncChecks::new(ctx).map_err(|e| format!("{op}: {e}"))?);
        }
        let checks = self.checks.as_mut().unwrap();
        if let Some(msg) = checks.poll(op).map_err(|e| format!("{op}: {e}"))? {
            return Err(msg);
        }
        Ok(checks.claim())
    }

    /// Behind the run's launches on `stream`: with sync checks, waits for them and fails this run on
    /// a bad index (the contract's message); otherwise records the event of the slot from
    /// [`before`](Self::before), read by a later run. `error`: where the launches wrote their error
    /// words (`Launched::error`), None when they launched no routing.
    ///
    /// # Safety
    /// `stream` holds the run's launches; `error` and `info.routing_indices` stay allocated until
    /// this returns.
    pub unsafe fn after(
        &mut self,
        op: &'static str,
        stream: CUstream,
        capturing: bool,
        slot: Option<(usize, CUdeviceptr)>,
        error: Option<CUdeviceptr>,
        info: &CheckInfo,
    ) -> Result<(), String> {
        let Some(error) = error else { return Ok(()) };
        if capturing {
            return Ok(());
        }
        if self.sync {
            // SAFETY: the caller keeps the error words and the indices allocated.
            let msg = unsafe { super::forward::check_sync(stream, error, op, info.it, info.routing_indices, info.k, info.experts) }
                .map_err(|e| format!("{op}: {e}"))?;
            return msg.map_or(Ok(()), Err);
        }
        if let (Some(c), Some((i, at))) = (self.checks.as_mut(), slot) {
            debug_assert_eq!(error, at);
            // SAFETY: the launches just enqueued on `stream` write slot i.
            unsafe { c.record(stream, i, info.k, info.experts) }.map_err(|e| format!("{op}: {e}"))?;
        }
        Ok(())
    }
}

/// Runs checked at once: a run whose copy is still in flight keeps its slot until it completes.
const SLOTS: usize = 8;

struct Pending {
    k: usize,
    experts: usize,
}

/// The pinned words and events of one kernel object (one node), for one CUDA context.
pub struct AsyncChecks {
    ctx: CUcontext,
    host: *mut i32,
    /// `host` as the device addresses it (mapped pinned memory)
    device: CUdeviceptr,
    events: Vec<CUevent>,
    pending: Vec<Option<Pending>>,
}

// SAFETY: driver handles and pinned memory are usable from any thread; callers serialise access.
unsafe impl Send for AsyncChecks {}

impl AsyncChecks {
    /// Allocates the pinned words and events in `ctx` (which must be current).
    pub fn new(ctx: CUcontext) -> CuResult<AsyncChecks> {
        let mut host = std::ptr::null_mut();
        driver::check(unsafe { sys::cuMemHostAlloc(&mut host, SLOTS * 8, sys::CU_MEMHOSTALLOC_DEVICEMAP) }, "cuMemHostAlloc")?;
        let mut me = AsyncChecks { ctx, host: host.cast(), device: 0, events: Vec::new(), pending: (0..SLOTS).map(|_| None).collect() };
        // (from here on, dropping `me` frees the memory if a call fails)
        driver::check(unsafe { sys::cuMemHostGetDevicePointer_v2(&mut me.device, host, 0) }, "cuMemHostGetDevicePointer")?;
        for _ in 0..SLOTS {
            let mut e = std::ptr::null_mut();
            driver::check(
                unsafe { sys::cuEventCreate(&mut e, sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32) },
                "cuEventCreate",
            )?;
            me.events.push(e);
        }
        Ok(me)
    }

    pub fn context(&self) -> CUcontext {
        self.ctx
    }

    /// Looks at every earlier run whose copy has completed (never waits); the first error found.
    pub fn poll(&mut self, op: &'static str) -> CuResult<Option<String>> {
        let mut found = None;
        for i in 0..SLOTS {
            let Some(p) = &self.pending[i] else { continue };
            match unsafe { sys::cuEventQuery(self.events[i]) } {
                CUresult::CUDA_SUCCESS => {}
                CUresult::CUDA_ERROR_NOT_READY => continue,
                r => driver::check(r, "cuEventQuery")?,
            }
            // SAFETY: the kernels that wrote this slot have completed (the event follows them);
            // volatile: the device wrote the words behind the compiler's back.
            let words = unsafe { [self.host.add(2 * i).read_volatile(), self.host.add(2 * i + 1).read_volatile()] };
            if found.is_none() {
                found = super::forward::error_message(op, words, p.k, p.experts, None).map(|m| {
                    format!(
                        "{m}, in an earlier run of this node (the CUDA kernels report bad indices asynchronously: that run \
                         clamped the index and its output is meaningless; set {SYNC_CHECKS_ENV}=1 to fail that run itself)"
                    )
                });
            }
            self.pending[i] = None;
        }
        Ok(found)
    }

    /// A free slot: its index, and the device address of its two int32 words, where this run's
    /// routing kernels are to write their error words. None when every slot is still in flight
    /// (the run then writes them to its workspace and goes unchecked). Nothing is reserved until
    /// [`record`](Self::record).
    pub fn claim(&self) -> Option<(usize, CUdeviceptr)> {
        let i = self.pending.iter().position(Option::is_none)?;
        Some((i, self.device + (8 * i) as CUdeviceptr))
    }

    /// Records the event behind a run whose kernels write their error words into `slot` (from
    /// [`claim`](Self::claim)); a later [`poll`](Self::poll) reads them once it has passed.
    ///
    /// # Safety
    /// `stream` must be a live stream of this object's context, holding that run's launches.
    pub unsafe fn record(&mut self, stream: CUstream, slot: usize, k: usize, experts: usize) -> CuResult<()> {
        unsafe { driver::check(sys::cuEventRecord(self.events[slot], stream), "cuEventRecord")? };
        self.pending[slot] = Some(Pending { k, experts });
        Ok(())
    }
}

impl Drop for AsyncChecks {
    fn drop(&mut self) {
        unsafe {
            let mut cur = std::ptr::null_mut();
            sys::cuCtxGetCurrent(&mut cur);
            if cur != self.ctx {
                sys::cuCtxSetCurrent(self.ctx);
            }
            for (i, e) in self.events.iter().enumerate() {
                if self.pending[i].is_some() {
                    sys::cuEventSynchronize(*e); // its kernels must be done writing before the memory goes
                }
                sys::cuEventDestroy_v2(*e);
            }
            sys::cuMemFreeHost(self.host.cast());
            if cur != self.ctx {
                sys::cuCtxSetCurrent(cur);
            }
        }
    }
}
