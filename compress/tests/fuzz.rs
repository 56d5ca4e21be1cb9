//! Hostile payloads: random bytes, random headers and mutated valid payloads decode to
//! an error or to values, never to a panic or an out-of-bounds write; each specific
//! inconsistency names itself.

mod common;

use common::normal;
use meshrec_compress::wire::VERSION;
use meshrec_compress::{decode_into, Apply, CompressError, DecodeScratch, MethodConfig, Payload};
use proptest::prelude::*;

fn methods() -> Vec<MethodConfig> {
    vec![
        MethodConfig::Identity,
        MethodConfig::Fp16,
        MethodConfig::Bf16,
        MethodConfig::TopK { ratio: 0.2 },
        MethodConfig::DgcTopK {
            ratio: 0.2,
            sample_ratio: 0.5,
        },
        MethodConfig::RandK {
            ratio: 0.2,
            unbiased: true,
        },
        MethodConfig::Threshold { threshold: 0.3 },
        MethodConfig::Qsgd {
            levels: 5,
            bucket: 16,
        },
        MethodConfig::TernGrad { chunk: 10 },
        MethodConfig::Sign { chunk: 9 },
        MethodConfig::PowerSgd {
            rank: 2,
            min_compression_rate: 1.0,
        },
    ]
}

/// Decodes into buffers of a few lengths (the header's, if small, and others) in
/// every mode; only checks that nothing panics and that the guard bytes around the
/// output are untouched.
fn try_decode(bytes: &[u8]) {
    let mut scratch = DecodeScratch::default();
    let claimed = meshrec_compress::peek(bytes).map(|h| h.len as usize).ok();
    let mut lens = vec![0usize, 1, 17, 64];
    if let Some(n) = claimed.filter(|&n| n <= 1 << 16) {
        lens.push(n);
    }
    for n in lens {
        for apply in [Apply::Set, Apply::Add, Apply::Sub] {
            let mut buf = vec![7.0f32; n + 2];
            let _ = decode_into(bytes, &mut buf[1..n + 1], apply, &mut scratch);
            assert_eq!(buf[0], 7.0);
            assert_eq!(buf[n + 1], 7.0);
        }
    }
}

fn valid_payloads() -> Vec<Vec<u8>> {
    let x = normal(100, 1);
    methods()
        .into_iter()
        .map(|cfg| {
            let mut c = cfg.build().unwrap();
            let mut ctx = meshrec_compress::Ctx {
                shape: Some((10, 10)),
                ..meshrec_compress::Ctx::seeded(3)
            };
            let mut p = Payload::new();
            c.compress_into(&x, &mut ctx, &mut p).unwrap();
            p.into_bytes()
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        try_decode(&bytes);
    }

    #[test]
    fn random_headers_never_panic(
        method in 0u8..13,
        len in prop_oneof![0u64..200, any::<u64>()],
        params in prop::collection::vec(any::<u8>(), 0..24),
        body in prop::collection::vec(any::<u8>(), 0..600),
    ) {
        let mut bytes = b"MRCZ".to_vec();
        bytes.extend_from_slice(&VERSION.to_le_bytes());
        bytes.push(method);
        bytes.push(0);
        bytes.extend_from_slice(&len.to_le_bytes());
        bytes.extend_from_slice(&params);
        bytes.extend_from_slice(&body);
        try_decode(&bytes);
    }

    #[test]
    fn mutated_payloads_never_panic(
        which in 0usize..11,
        flips in prop::collection::vec((any::<usize>(), any::<u8>()), 1..6),
    ) {
        let mut bytes = valid_payloads().swap_remove(which);
        let n = bytes.len();
        for (at, v) in flips {
            bytes[at % n] ^= v.max(1);
        }
        try_decode(&bytes);
    }

    #[test]
    fn truncated_or_extended_payloads_are_errors(which in 0usize..11, cut in any::<usize>(), extra in prop::collection::vec(any::<u8>(), 1..9)) {
        let bytes = valid_payloads().swap_remove(which);
        let mut out = vec![0f32; 100];
        let mut s = DecodeScratch::default();
        let cut = cut % bytes.len();
        prop_assert!(decode_into(&bytes[..cut], &mut out, Apply::Set, &mut s).is_err());
        let mut longer = bytes.clone();
        longer.extend_from_slice(&extra);
        prop_assert!(
            matches!(decode_into(&longer, &mut out, Apply::Set, &mut s), Err(CompressError::Oversized { .. })),
            "method {which}"
        );
        prop_assert!(decode_into(&bytes, &mut out, Apply::Set, &mut s).is_ok());
    }
}

fn payload(cfg: MethodConfig, x: &[f32]) -> Vec<u8> {
    cfg.build().unwrap().compress(x, 1).unwrap().into_bytes()
}

fn decode(bytes: &[u8], n: usize) -> Result<Vec<f32>, CompressError> {
    let mut out = vec![0f32; n];
    decode_into(bytes, &mut out, Apply::Set, &mut DecodeScratch::default())?;
    Ok(out)
}

#[test]
fn named_inconsistencies() {
    let x = normal(64, 2);
    // Sparse: header (16) + k (8) + index bytes (8) + 7 one-byte gaps + 7 values.
    let topk = payload(MethodConfig::TopK { ratio: 0.1 }, &x);
    assert!(decode(&topk, 64).is_ok());
    assert_eq!(topk.len(), 32 + 7 + 28);

    // k > n.
    let mut b = topk.clone();
    b[8..16].copy_from_slice(&3u64.to_le_bytes());
    assert!(matches!(
        decode(&b, 3),
        Err(CompressError::Inconsistent { .. }) | Err(CompressError::Oversized { .. })
    ));
    let mut b = topk.clone();
    b[16..24].copy_from_slice(&65u64.to_le_bytes());
    let e = decode(&b, 64).unwrap_err();
    assert!(e.to_string().contains("exceeds length"), "{e}");

    // Index out of range leaves the output untouched: the last gap pushed past n.
    let mut b = topk.clone();
    b[38] = 0x7F;
    let mut out = vec![5f32; 64];
    let e = decode_into(&b, &mut out, Apply::Set, &mut DecodeScratch::default()).unwrap_err();
    assert!(e.to_string().contains("out of range"), "{e}");
    assert!(out.iter().all(|&v| v == 5.0));

    // Index bytes that cannot hold k indices, a varint running past its section, one
    // longer than a u32's five bytes, and a section with bytes left over.
    let mut b = topk.clone();
    b[24..32].copy_from_slice(&6u64.to_le_bytes());
    let e = decode(&b, 64).unwrap_err();
    assert!(e.to_string().contains("cannot hold 7 indices"), "{e}");
    let mut b = topk.clone();
    b[38] |= 0x80;
    let e = decode(&b, 64).unwrap_err();
    assert!(e.to_string().contains("ends inside index 6"), "{e}");
    let mut long = topk[..32].to_vec();
    long[16..24].copy_from_slice(&1u64.to_le_bytes());
    long[24..32].copy_from_slice(&5u64.to_le_bytes());
    long.extend_from_slice(&[0x80, 0x80, 0x80, 0x80, 0x80]);
    long.extend_from_slice(&1f32.to_le_bytes());
    let e = decode(&long, 64).unwrap_err();
    assert!(e.to_string().contains("longer than 5 bytes"), "{e}");
    let mut spare = topk[..32].to_vec();
    spare[16..24].copy_from_slice(&1u64.to_le_bytes());
    spare[24..32].copy_from_slice(&2u64.to_le_bytes());
    spare.extend_from_slice(&[3, 0]);
    spare.extend_from_slice(&1f32.to_le_bytes());
    let e = decode(&spare, 64).unwrap_err();
    assert!(e.to_string().contains("its 1 indices use 1"), "{e}");

    // Wrong version, magic, flags, method.
    let mut b = topk.clone();
    b[4] = 1;
    assert!(matches!(
        decode(&b, 64),
        Err(CompressError::BadVersion {
            found: 1,
            supported: VERSION
        })
    ));
    let mut b = topk.clone();
    b[0] = b'X';
    assert!(matches!(
        decode(&b, 64),
        Err(CompressError::BadMagic { .. })
    ));
    // Flags: bit 0 (bf16 values) only on sparse payloads, no other bit anywhere.
    let mut b = topk.clone();
    b[7] = 2;
    assert!(matches!(decode(&b, 64), Err(CompressError::BadFlags(2))));
    let mut b = payload(MethodConfig::Identity, &x);
    b[7] = 1;
    assert!(matches!(decode(&b, 64), Err(CompressError::BadFlags(1))));
    // A sparse payload flagged bf16 has a different body length: 14 bytes too many.
    let mut b = topk.clone();
    b[7] = 1;
    assert!(matches!(
        decode(&b, 64),
        Err(CompressError::Oversized { .. })
    ));
    let mut b = topk.clone();
    b[6] = 99;
    assert!(matches!(
        decode(&b, 64),
        Err(CompressError::UnknownMethod(99))
    ));

    // Output of the wrong length.
    assert!(matches!(
        decode(&topk, 63),
        Err(CompressError::LengthMismatch { .. })
    ));

    // NaN / infinite / negative scales.
    for cfg in [
        MethodConfig::Qsgd {
            levels: 3,
            bucket: 32,
        },
        MethodConfig::TernGrad { chunk: 32 },
        MethodConfig::Sign { chunk: 32 },
    ] {
        let good = payload(cfg.clone(), &x);
        let at = meshrec_compress::peek(&good).unwrap().prefix_len();
        for bad in [f32::NAN, f32::INFINITY, -1.0] {
            let mut b = good.clone();
            b[at + 4..at + 8].copy_from_slice(&bad.to_le_bytes());
            let e = decode(&b, 64).unwrap_err();
            assert!(
                matches!(e, CompressError::BadScale { index: 1, .. }),
                "{cfg:?}: {e}"
            );
        }
    }

    // QSGD level above s; TernGrad code 3.
    let mut b = payload(
        MethodConfig::Qsgd {
            levels: 5,
            bucket: 64,
        },
        &x,
    );
    let at = meshrec_compress::peek(&b).unwrap().prefix_len() + 4;
    b[at] = 0xFF; // first code: 4 bits = 0b1111 -> level 7 > 5
    assert!(decode(&b, 64)
        .unwrap_err()
        .to_string()
        .contains("level 7 > 5 in bucket 0"));
    let mut b = payload(MethodConfig::TernGrad { chunk: 64 }, &x);
    let at = meshrec_compress::peek(&b).unwrap().prefix_len() + 4;
    b[at] = 0b11;
    assert!(decode(&b, 64).unwrap_err().to_string().contains("code 3"));

    // PowerSGD: rank above min(rows, cols), or a view that does not fit the length.
    let mut ctx = meshrec_compress::Ctx {
        shape: Some((8, 8)),
        ..Default::default()
    };
    let mut c = MethodConfig::PowerSgd {
        rank: 1,
        min_compression_rate: 1.0,
    }
    .build()
    .unwrap();
    let mut p = Payload::new();
    c.compress_into(&x, &mut ctx, &mut p).unwrap();
    let good = p.into_bytes();
    assert!(decode(&good, 64).is_ok());
    let mut b = good.clone();
    b[16..20].copy_from_slice(&4u32.to_le_bytes()); // rows 4: 4 x 8 < 64
    assert!(decode(&b, 64).is_err());
    let mut b = good.clone();
    b[24..28].copy_from_slice(&0u32.to_le_bytes()); // rank 0
    assert!(decode(&b, 64).is_err());

    // A tiny payload claiming a huge length cannot make `decode` allocate it.
    let mut b = payload(MethodConfig::TopK { ratio: 0.1 }, &[]);
    b[8..16].copy_from_slice(&(1u64 << 40).to_le_bytes());
    assert!(Payload::from_bytes(b).decode(1 << 20).is_err());

    // Decoding with the wrong method's compressor.
    let mut sign = MethodConfig::Sign { chunk: 8 }.build().unwrap();
    let mut out = vec![0f32; 64];
    assert!(matches!(
        sign.decompress_into(&topk, &mut out, Apply::Set),
        Err(CompressError::MethodMismatch { .. })
    ));
}

#[test]
fn bad_configs_are_rejected() {
    for cfg in [
        MethodConfig::TopK { ratio: 0.0 },
        MethodConfig::TopK { ratio: 1.5 },
        MethodConfig::TopK { ratio: f64::NAN },
        MethodConfig::Threshold { threshold: -1.0 },
        MethodConfig::Qsgd {
            levels: 0,
            bucket: 8,
        },
        MethodConfig::Qsgd {
            levels: 1 << 16,
            bucket: 8,
        },
        MethodConfig::Sign { chunk: 0 },
        MethodConfig::PowerSgd {
            rank: 0,
            min_compression_rate: 1.0,
        },
    ] {
        assert!(cfg.build().is_err(), "{cfg:?}");
    }
}

#[test]
fn non_finite_inputs_are_errors_for_scaled_methods() {
    let mut x = normal(64, 1);
    x[5] = f32::NAN;
    for cfg in [
        MethodConfig::Qsgd {
            levels: 3,
            bucket: 32,
        },
        MethodConfig::TernGrad { chunk: 32 },
        MethodConfig::Sign { chunk: 32 },
    ] {
        let e = cfg.build().unwrap().compress(&x, 0).unwrap_err();
        assert!(
            matches!(e, CompressError::NonFiniteInput { index: 0, .. }),
            "{cfg:?}: {e}"
        );
    }
    // Top-k sends a NaN rather than hiding it in the residual.
    let y = MethodConfig::TopK { ratio: 0.02 }
        .build()
        .unwrap()
        .compress(&x, 0)
        .unwrap()
        .decode(64)
        .unwrap();
    assert!(y[5].is_nan());
}
