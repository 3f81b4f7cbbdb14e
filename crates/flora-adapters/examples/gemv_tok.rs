// Throwaway: one token of SmolLM2's bf16 GEMVs laid out in the decode arena, vs the plain reader.
use flora_adapters::cpu::bf16::{arrange_for_decode, gemm, PackedBf16};
use flora_adapters::cpu::team::{par_for, with_team};
use std::time::Instant;
fn main() {
    let layer = [(576usize, 576usize), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)];
    let mut mats: Vec<PackedBf16> = Vec::new();
    for l in 0..30 { for (i, &(k, n)) in layer.iter().enumerate() { mats.push(PackedBf16::pack(&vec![0.001 * (l * 7 + i) as f32; k * n], k, n)); } }
    mats.push(PackedBf16::pack(&vec![0.002f32; 576 * 49152], 576, 49152));
    { let mut refs: Vec<&mut PackedBf16> = mats.iter_mut().collect(); arrange_for_decode(&mut refs, rayon::current_num_threads()); }
    let bytes: usize = mats.iter().map(|m| m.k() * m.n() * 2).sum();
    let x = vec![0.5f32; 1536];
    let mut y = vec![0f32; 49152];
    let buf: Vec<u64> = (0..32u64 << 20).collect();
    for _ in 0..8 {
        let t = Instant::now();
        let share = buf.len() / 2;
        let s: Vec<std::sync::atomic::AtomicU64> = (0..2).map(|_| 0.into()).collect();
        with_team(|| par_for(2, |i| { let mut acc = [0u64; 8]; for c in buf[i*share..(i+1)*share].chunks_exact(8) { for l in 0..8 { acc[l] = acc[l].wrapping_add(c[l]); } } s[i].store(acc.iter().sum(), std::sync::atomic::Ordering::Relaxed); }));
        let rd = (buf.len() * 8) as f64 / t.elapsed().as_secs_f64() / 1e9;
        let reps = 20;
        let t = Instant::now();
        with_team(|| for _ in 0..reps { for m in &mats { gemm(&mut y, m.n(), &x, m.k(), 1, m); } });
        let ms = t.elapsed().as_secs_f64() / reps as f64 * 1e3;
        println!("reader {rd:.1} GB/s = {:.0} tok/s | arena GEMVs of one token: {ms:.2} ms, {:.1} GB/s, {:.0} tok/s = {:.2}x", rd * 1e9 / bytes as f64, bytes as f64 / ms / 1e6, 1e3 / ms, (1e3 / ms) / (rd * 1e9 / bytes as f64));
    }
}
