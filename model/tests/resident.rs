//! The device-resident step (loss and AdamW as tensor ops) against the host path: the loss
//! kernel, its vocab-parallel form, AdamW, a whole step, and what a step copies between host
//! and device. Runs on the CPU backend and, in CI, on wgpu (`MESHREC_TEST_DEVICE=wgpu`).

use std::sync::{Arc, Barrier, Mutex};

use burn::tensor::{Device, Tensor, TensorData};
use meshrec_model::data::Batch;
use meshrec_model::device::{test_device, Residency};
use meshrec_model::device_loss::device_cross_entropy;
use meshrec_model::device_optim::{global_norm, DeviceAdamW};
use meshrec_model::dropout::seed_dropout_on_device;
use meshrec_model::loss::{fused_cross_entropy, SingleShard, TableShard, VocabReducer};
use meshrec_model::optim::{clip_by_global_norm, clip_scale, sum_of_squares, AdamW, AdamWConfig};
use meshrec_model::params::{init_normal, param_paths, read_values, to_host, write_values};
use meshrec_model::step::{forward_backward_on_device, DeviceStepOutput};
use meshrec_model::transfer::{upload, Transferred};
use meshrec_model::{ModelConfig, Preset, Recommender, SideInputs};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The device's generator is process-wide on some backends (Flex): the tests that draw from
/// it (a model's initialisation does too) take turns, as a single-device run's steps do.
static DEVICE_RNG: Mutex<()> = Mutex::new(());

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

fn tensor(values: Vec<f32>, dims: [usize; 2], device: &Device) -> Tensor<2> {
    upload(TensorData::new(values, dims), device)
}

fn assert_close(a: &[f32], b: &[f32], tol: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    let scale = b.iter().fold(1e-3f32, |acc, x| acc.max(x.abs()));
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= tol * scale,
            "{what}[{i}]: {x} vs {y} (scale {scale})"
        );
    }
}

/// Rows 10, items 1..=13, dim 6; chunks of 3 rows so the last chunk is short.
#[test]
fn device_loss_equals_the_host_kernel() {
    let device = test_device();
    let (n, items, dim) = (10, 13, 6);
    let h = random(n * dim, 1);
    let table = random(items * dim, 2);
    let targets: Vec<u32> = (0..n as u32).map(|i| 1 + (i * 7) % items as u32).collect();
    let host = fused_cross_entropy(
        &h,
        &targets,
        TableShard::new(&table, dim, 1),
        0.25,
        3,
        &mut SingleShard,
    )
    .unwrap();
    let out = device_cross_entropy(
        tensor(h, [n, dim], &device),
        &targets,
        tensor(table, [items, dim], &device),
        1,
        0.25,
        3,
        &mut SingleShard,
    )
    .unwrap();
    let loss = f64::from(to_host(out.loss_sum)[0]);
    assert!(
        (loss - host.loss_sum).abs() < 1e-4 * host.loss_sum.abs(),
        "{loss} vs {}",
        host.loss_sum
    );
    assert_close(&to_host(out.dh), &host.dh, 1e-4, "dh");
    assert_close(&to_host(out.d_table), &host.d_table, 1e-4, "d_table");
}

/// Two vocabulary shards, one thread each, whose reducer exchanges through shared memory.
struct PairReducer {
    me: usize,
    shared: Arc<(Barrier, Mutex<[Vec<f32>; 2]>)>,
    calls: usize,
}

impl PairReducer {
    fn exchange(&mut self, values: &mut [f32], combine: fn(f32, f32) -> f32) {
        let (barrier, slots) = &*self.shared;
        slots.lock().unwrap()[self.me] = values.to_vec();
        barrier.wait();
        let other = slots.lock().unwrap()[1 - self.me].clone();
        barrier.wait();
        for (v, o) in values.iter_mut().zip(other) {
            *v = combine(*v, o);
        }
        self.calls += 1;
    }
}

impl VocabReducer for PairReducer {
    type Error = std::convert::Infallible;
    fn all_max(&mut self, values: &mut [f32]) -> Result<(), Self::Error> {
        self.exchange(values, f32::max);
        Ok(())
    }
    fn all_sum(&mut self, values: &mut [f32]) -> Result<(), Self::Error> {
        self.exchange(values, |a, b| a + b);
        Ok(())
    }
}

/// The vocab-parallel form: each shard's loss equals the unsharded one, its table gradient
/// is the unsharded gradient's rows, and its partial `dh` sums to the full one.
#[test]
fn vocab_parallel_device_loss_equals_the_unsharded_one() {
    let (n, items, dim) = (9, 11, 4);
    let h = random(n * dim, 3);
    let table = random(items * dim, 4);
    // Targets on both shards (items 1..=6 on shard 0, 7..=11 on shard 1).
    let targets: Vec<u32> = (0..n as u32).map(|i| 1 + (i * 5) % items as u32).collect();
    let whole = fused_cross_entropy(
        &h,
        &targets,
        TableShard::new(&table, dim, 1),
        1.0,
        4,
        &mut SingleShard,
    )
    .unwrap();
    let shared = Arc::new((Barrier::new(2), Mutex::new([Vec::new(), Vec::new()])));
    let split = 6;
    let shards: Vec<_> = (0..2)
        .map(|me| {
            let (h, table, targets, shared) =
                (h.clone(), table.clone(), targets.clone(), shared.clone());
            std::thread::spawn(move || {
                let device = test_device();
                let (first, rows) = if me == 0 {
                    (0, split)
                } else {
                    (split, items - split)
                };
                let mut reducer = PairReducer {
                    me,
                    shared,
                    calls: 0,
                };
                let out = device_cross_entropy(
                    tensor(h, [n, dim], &device),
                    &targets,
                    tensor(
                        table[first * dim..(first + rows) * dim].to_vec(),
                        [rows, dim],
                        &device,
                    ),
                    1 + first as u32,
                    1.0,
                    4,
                    &mut reducer,
                )
                .unwrap();
                let loss = to_host(out.loss_sum)[0];
                (loss, to_host(out.dh), to_host(out.d_table), reducer.calls)
            })
        })
        .collect();
    let results: Vec<_> = shards.into_iter().map(|t| t.join().unwrap()).collect();
    let mut dh = vec![0.0f32; n * dim];
    for (me, (loss, part, d_table, calls)) in results.into_iter().enumerate() {
        assert!(
            (f64::from(loss) - whole.loss_sum).abs() < 1e-4 * whole.loss_sum,
            "shard {me}: {loss} vs {}",
            whole.loss_sum
        );
        // Three chunks of rows, two collectives each (row max; sum and target logit).
        assert_eq!(calls, 6, "shard {me}");
        let first = if me == 0 { 0 } else { split };
        let want = &whole.d_table[first * dim..first * dim + d_table.len()];
        assert_close(&d_table, want, 1e-4, &format!("shard {me} d_table"));
        for (a, b) in dh.iter_mut().zip(part) {
            *a += b;
        }
    }
    assert_close(&dh, &whole.dh, 1e-4, "summed dh");
}

fn tiny(dropout: f64, device: &Device) -> (ModelConfig, Recommender) {
    let mut config = ModelConfig::preset(Preset::Tiny, 30);
    config.dropout = dropout;
    let m = Recommender::new(&config, &SideInputs::default(), device);
    let m = init_normal(m, 3, config.init_std, config.n_layers, device);
    (config, m)
}

fn batch() -> Batch {
    Batch {
        batch_size: 3,
        seq_len: 8,
        inputs: vec![
            1, 2, 3, 4, 5, 6, 0, 0, 9, 8, 7, 6, 5, 4, 3, 2, 11, 12, 13, 14, 15, 16, 17, 18,
        ],
        targets: vec![
            2, 3, 4, 5, 6, 7, 0, 0, 8, 7, 6, 5, 4, 3, 2, 1, 12, 13, 14, 15, 16, 17, 18, 19,
        ],
    }
}

fn grads_to_host(out: &DeviceStepOutput) -> Vec<Vec<f32>> {
    out.grads.iter().cloned().map(to_host).collect()
}

/// A whole step with the loss on the device equals the step with the host kernel: the loss,
/// every gradient and, after three AdamW updates with clipping (device AdamW against host
/// AdamW), every parameter, to 1e-4.
#[test]
fn device_resident_steps_equal_host_steps() {
    let _turn = DEVICE_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let device = test_device().autodiff();
    let (_, start) = tiny(0.0, &device);
    let infos = param_paths(&start);
    let decay: Vec<bool> = infos.iter().map(|p| p.shape.len() > 1).collect();
    let config = AdamWConfig::default();
    let batch = batch();
    let scale = 1.0 / batch.num_targets() as f32;
    let max_norm = 0.5;

    let mut host_model = start.clone();
    let mut values = read_values(&start);
    let mut host_opt = AdamW::new(config, infos.iter().map(|p| p.numel()));
    let mut device_model = start;
    let mut device_opt = DeviceAdamW::new(config, &infos, &device);
    for step in 0..3 {
        let host = forward_backward_on_device(&host_model, &batch, scale, Residency::Host, &device);
        let dev =
            forward_backward_on_device(&device_model, &batch, scale, Residency::Device, &device);
        assert_eq!(host.targets, dev.targets);
        assert!(
            (host.loss_sum - dev.loss_sum).abs() < 1e-4 * host.loss_sum,
            "step {step}: loss {} vs {}",
            host.loss_sum,
            dev.loss_sum
        );
        let mut host_grads = grads_to_host(&host);
        for (info, (a, b)) in infos
            .iter()
            .zip(grads_to_host(&dev).iter().zip(&host_grads))
        {
            assert_close(a, b, 1e-4, &format!("step {step} grad {}", info.path));
        }
        let norm = sum_of_squares(&host_grads).sqrt();
        let dev_norm = global_norm(&dev.grads);
        assert!(
            (norm - dev_norm).abs() < 1e-4 * norm,
            "{norm} vs {dev_norm}"
        );
        assert!(norm > max_norm, "the test should clip (norm {norm})");
        clip_by_global_norm(&mut host_grads, norm, max_norm);
        host_opt.update(&mut values, &host_grads, 1e-2, &decay);
        host_model = write_values(host_model, &values, &device);
        device_model = device_opt.update(
            device_model,
            dev.grads,
            1e-2,
            clip_scale(dev_norm, max_norm),
            &decay,
        );
        for (info, (a, b)) in infos
            .iter()
            .zip(read_values(&device_model).iter().zip(&values))
        {
            assert_close(a, b, 1e-4, &format!("step {step} value {}", info.path));
        }
    }
    let (m, v) = device_opt.moments_to_host();
    for (i, info) in infos.iter().enumerate() {
        assert_close(&m[i], &host_opt.m[i], 1e-4, &format!("m {}", info.path));
        assert_close(&v[i], &host_opt.v[i], 1e-4, &format!("v {}", info.path));
    }
}

/// What a device-resident step copies: the batch up (input ids, the loss rows and their
/// targets' columns and shard flags) and two scalars down (the loss, the gradient norm) —
/// no parameter, gradient, optimizer moment or dropout mask. The host path copies the table,
/// the hidden rows and every gradient and parameter.
#[test]
fn a_device_resident_step_moves_only_the_batch_and_two_scalars() {
    let _turn = DEVICE_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let device = test_device().autodiff();
    let (_, m) = tiny(0.2, &device);
    let infos = param_paths(&m);
    let decay: Vec<bool> = infos.iter().map(|p| p.shape.len() > 1).collect();
    let mut opt = DeviceAdamW::new(AdamWConfig::default(), &infos, &device);
    let batch = batch();
    let n = batch.num_targets() as u64;
    let scale = 1.0 / n as f32;

    seed_dropout_on_device(&device, 7);
    let before = Transferred::now();
    let out = forward_backward_on_device(&m, &batch, scale, Residency::Device, &device);
    let norm = global_norm(&out.grads);
    let _m = opt.update(m.clone(), out.grads, 1e-3, clip_scale(norm, 1.0), &decay);
    let moved = Transferred::now().since(before);
    let ids = (batch.inputs.len() * 8) as u64;
    // Positions (i64), target columns (i64), on-shard flags (f32).
    assert_eq!(moved.to_device, ids + n * (8 + 8 + 4), "{moved:?}");
    assert_eq!(moved.to_host, 4 + 4, "{moved:?}");

    let before = Transferred::now();
    meshrec_model::dropout::seed_dropout(7);
    let host = forward_backward_on_device(&m, &batch, scale, Residency::Host, &device);
    let moved_host = Transferred::now().since(before);
    // Down: the whole table (31 rows of 16) and the loss rows; up: their gradients, and the
    // dropout masks (each as large as the activations).
    let (table, rows) = (31 * 16, n * 16);
    assert_eq!(moved_host.to_host, 4 * (table + rows), "{moved_host:?}");
    let activations = (batch.inputs.len() * 16) as u64;
    assert!(
        moved_host.to_device > ids + 4 * (table + rows + activations),
        "{moved_host:?}"
    );
    assert_eq!(host.targets as u64, n);
}

/// Masks drawn on the device are reproducible by the step's seed and differ between seeds.
#[test]
fn device_dropout_masks_follow_the_step_seed() {
    let _turn = DEVICE_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let device = test_device().autodiff();
    let (_, m) = tiny(0.3, &device);
    let batch = batch();
    let loss = |seed: u64| {
        seed_dropout_on_device(&device, seed);
        forward_backward_on_device(&m, &batch, 1.0, Residency::Device, &device).loss_sum
    };
    let (a, b, c) = (loss(5), loss(5), loss(6));
    assert_eq!(a, b, "same seed, same masks");
    assert_ne!(a, c, "another seed, other masks");
    meshrec_model::dropout::seed_dropout(0);
}

/// Device names: what each spelling picks, and an error naming the key for the rest.
#[test]
fn device_names_pick_an_adapter_or_say_why_not() {
    use meshrec_model::device::{parse_device, runs_on_host};
    let err = |name: &str| parse_device(name).unwrap_err().to_string();
    assert!(
        err("tpu").contains("unknown device `tpu`"),
        "{}",
        err("tpu")
    );
    assert!(err("cuda:x").contains("not a number"), "{}", err("cuda:x"));
    #[cfg(feature = "flex")]
    assert!(runs_on_host(&parse_device("cpu").unwrap()));
    #[cfg(not(feature = "wgpu"))]
    assert!(
        err("wgpu:cpu").contains("--features wgpu"),
        "{}",
        err("wgpu:cpu")
    );
    #[cfg(feature = "wgpu")]
    {
        use meshrec_model::device::describe;
        let cpu = parse_device("wgpu:cpu").unwrap();
        assert!(!runs_on_host(&cpu));
        assert!(describe(&cpu).contains("no card"), "{}", describe(&cpu));
        let msg = err("wgpu:99");
        assert!(
            msg.contains("`wgpu:99`: wgpu lists") && msg.contains("0: "),
            "{msg}"
        );
        assert!(
            err("wgpu:fast").contains("expected `cpu`, `gpu`"),
            "{}",
            err("wgpu:fast")
        );
        // A GPU where the machine has one; else an error listing what wgpu found.
        match parse_device("wgpu:gpu") {
            Ok(gpu) => assert!(describe(&gpu).contains("(GPU"), "{}", describe(&gpu)),
            Err(e) => assert!(
                e.to_string().contains("no GPU adapter (adapters: 0: "),
                "{e}"
            ),
        }
        eprintln!(
            "wgpu default adapter: {}",
            describe(&parse_device("wgpu").unwrap())
        );
    }
}
