//! NVML's v1 memory call, `nvmlDeviceGetMemoryInfo`, which nvml-wrapper does not expose (it
//! calls only `_v2`, which drivers before R510 lack). The one `unsafe` in the agent: a call
//! through the symbol nvml-wrapper already loaded, with a plain C struct.
#![allow(unsafe_code)]

use nvml_wrapper::error::{NvmlError, nvml_try};
use nvml_wrapper::{Device, Nvml};
use nvml_wrapper_sys::bindings::nvmlMemory_t;

/// Total memory in bytes through the v1 call.
pub fn total(nvml: &Nvml, device: &Device) -> Result<u64, NvmlError> {
    let Ok(get) = &nvml.lib().nvmlDeviceGetMemoryInfo else {
        return Err(NvmlError::FunctionNotFound);
    };
    let mut info = nvmlMemory_t {
        total: 0,
        free: 0,
        used: 0,
    };
    // SAFETY: `get` is NVML's nvmlDeviceGetMemoryInfo, resolved from the library `nvml` keeps
    // loaded for as long as `device` (which borrows it) lives; `device.handle()` is the live
    // handle NVML gave for it; `info` is a properly aligned, writable nvmlMemory_t that NVML
    // fills and does not keep.
    let code = unsafe { get(device.handle(), &mut info) };
    nvml_try(code)?;
    Ok(info.total)
}
