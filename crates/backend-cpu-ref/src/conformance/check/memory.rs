//! upload / download / write / fill round trips, and the seeded uniform fill
//! (`fill_uniform`: the reference's values rounded to the dtype, bit for bit),
//! all of which must be exact.

use half::{bf16, f16};
use pagoda_backend::{Backend, DType, HostSlice, HostVec, UniformFill};

use super::mismatches;
use crate::conformance::random::round_to;
use crate::conformance::{cpu, dev, CheckResult, Harness, GUARD};

pub(crate) fn run<B: Backend>(h: &mut Harness<'_, B>, sizes: &[usize]) {
    for &n in sizes {
        let label = format!("{n} elements");
        h.case("memory", &label, |h, rng| {
            let d = h.device;
            let act = h.dtype;
            let mut rows: Vec<CheckResult> = Vec::new();
            let mut exact =
                |op: &str, changed: usize| rows.push(h.exact_count(op, &label, changed, "elements differ"));

            // Activation-dtype floats, from f32 host data.
            let data = rng.normals(n, 1.0, act);
            let t = dev(d.upload(HostSlice::F32(&data), &[n], act))?;
            exact("memory/upload f32 -> act", mismatches(&data, &dev(d.download_f32(&t))?));
            let raw = dev(d.download(&t))?;
            exact("memory/download keeps dtype", usize::from(raw.dtype() != act));

            // Half-precision host data, typed and as raw little-endian bytes.
            let b: Vec<bf16> = data.iter().map(|&x| bf16::from_f32(x)).collect();
            let want: Vec<f32> = b.iter().map(|x| round_to(act, x.to_f32())).collect();
            let t = dev(d.upload(HostSlice::BF16(&b), &[n], act))?;
            exact("memory/upload bf16 -> act", mismatches(&want, &dev(d.download_f32(&t))?));
            let hf: Vec<f16> = data.iter().map(|&x| f16::from_f32(x)).collect();
            let bytes: Vec<u8> = hf.iter().flat_map(|x| x.to_le_bytes()).collect();
            let want: Vec<f32> = hf.iter().map(|x| round_to(act, x.to_f32())).collect();
            let t = dev(d.upload(HostSlice::Bytes(&bytes, DType::F16), &[n], act))?;
            exact("memory/upload f16 bytes -> act", mismatches(&want, &dev(d.download_f32(&t))?));

            // Integers are stored exactly.
            let ints: Vec<i32> = (0..n).map(|_| rng.next_u64() as i32).collect();
            let t = dev(d.upload(HostSlice::I32(&ints), &[n], DType::I32))?;
            let back = dev(d.download(&t))?;
            exact("memory/upload i32", usize::from(back != HostVec::I32(ints)));
            let longs: Vec<i64> = (0..n).map(|_| rng.next_u64() as i64).collect();
            let t = dev(d.upload(HostSlice::I64(&longs), &[n], DType::I64))?;
            let back = dev(d.download(&t))?;
            exact("memory/upload i64", usize::from(back != HostVec::I64(longs)));

            // write and fill into the middle row of three touch only that row.
            let whole = dev(d.alloc(&[3, n], act))?;
            dev(d.fill(&whole, GUARD))?;
            let middle = dev(whole.narrow(1, 1))?;
            dev(d.write(&middle, HostSlice::F32(&data)))?;
            let mut want = vec![GUARD; n];
            want.extend(&data);
            want.extend(vec![GUARD; n]);
            exact("memory/write view", mismatches(&want, &dev(d.download_f32(&whole))?));
            dev(d.fill(&middle, -0.5))?;
            want[n..2 * n].fill(-0.5);
            exact("memory/fill view", mismatches(&want, &dev(d.download_f32(&whole))?));
            let ids = dev(d.alloc(&[n], DType::I32))?;
            dev(d.fill(&ids, -1.0))?;
            exact("memory/fill i32", usize::from(dev(d.download(&ids))? != HostVec::I32(vec![-1; n])));
            let slots = dev(d.alloc(&[n], DType::I64))?;
            dev(d.fill(&slots, 3.0))?;
            exact("memory/fill i64", usize::from(dev(d.download(&slots))? != HostVec::I64(vec![3; n])));

            // Seeded uniform values: the whole tensor in the activation dtype and in F32.
            let fill = UniformFill::new(rng.next_u64(), -0.75, 1.25);
            let reference = cpu(h.cpu.alloc(&[n], DType::F32))?;
            cpu(h.cpu.fill_uniform(&reference, &fill))?;
            let values = cpu(h.cpu.download_f32(&reference))?;
            for dtype in [act, DType::F32] {
                let t = dev(d.alloc(&[n], dtype))?;
                dev(d.fill_uniform(&t, &fill))?;
                let want: Vec<f32> = values.iter().map(|&x| round_to(dtype, x)).collect();
                exact(
                    &format!("memory/fill_uniform {dtype:?}"),
                    mismatches(&want, &dev(d.download_f32(&t))?),
                );
            }
            // Columns 3..3+n of rows 5 and 6 of a [_, n + 11] tensor, into the
            // middle rows of four (a tensor-parallel shard of a row-parallel weight).
            let part = UniformFill::new(rng.next_u64(), -1e-3, 1e-3).at(5, 3, n + 11);
            let reference = cpu(h.cpu.alloc(&[2, n], DType::F32))?;
            cpu(h.cpu.fill_uniform(&reference, &part))?;
            let mut want = vec![GUARD; n];
            want.extend(cpu(h.cpu.download_f32(&reference))?.iter().map(|&x| round_to(act, x)));
            want.extend(vec![GUARD; n]);
            let whole = dev(d.alloc(&[4, n], act))?;
            dev(d.fill(&whole, GUARD))?;
            dev(d.fill_uniform(&dev(whole.narrow(1, 2))?, &part))?;
            let got = dev(d.download_f32(&whole))?;
            exact("memory/fill_uniform columns view", mismatches(&want, &got));
            Ok(rows)
        });
    }
}
