//! Every copy between host memory and a burn device goes through here, and is counted.
//!
//! A step's `host_transfer_bytes` (metrics.jsonl) is the difference of this thread's
//! counter around the step: on a GPU backend it says whether the step stayed on the device
//! (only the batch and a few scalars cross), on the CPU backend what the host-side loss and
//! optimizer copy. Counters are per thread because a rank of the local mesh is a thread.

use std::cell::Cell;

use burn::tensor::kind::Basic;
use burn::tensor::{Device, Tensor, TensorData};

thread_local! {
    static UPLOADED: Cell<u64> = const { Cell::new(0) };
    static DOWNLOADED: Cell<u64> = const { Cell::new(0) };
}

/// Bytes this thread has moved so far, host to device and device to host.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Transferred {
    pub to_device: u64,
    pub to_host: u64,
}

impl Transferred {
    /// This thread's running totals.
    pub fn now() -> Self {
        Self {
            to_device: UPLOADED.with(Cell::get),
            to_host: DOWNLOADED.with(Cell::get),
        }
    }

    /// What moved between `earlier` and `self`.
    pub fn since(self, earlier: Self) -> Self {
        Self {
            to_device: self.to_device - earlier.to_device,
            to_host: self.to_host - earlier.to_host,
        }
    }

    pub fn total(self) -> u64 {
        self.to_device + self.to_host
    }
}

/// A tensor on `device` from host data, counted.
pub fn upload<const D: usize, K: Basic>(data: TensorData, device: &Device) -> Tensor<D, K> {
    UPLOADED.with(|c| c.set(c.get() + data.as_bytes().len() as u64));
    Tensor::from_data(data, device)
}

/// A float tensor's values as a flat row-major `Vec<f32>` on the host (converted from
/// whatever float type the backend holds), counted in the backend's own element size.
pub fn download<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    let data = t.into_data();
    DOWNLOADED.with(|c| c.set(c.get() + data.as_bytes().len() as u64));
    data.convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap_or_default()
}

/// One float scalar read back (a loss, a norm), counted.
pub fn download_scalar(t: Tensor<1>) -> f32 {
    download(t).first().copied().unwrap_or(f32::NAN)
}
