//! Times one batched decode step of a model: N sequences (each with a
//! 3-token history) advancing one token together through
//! `Model::forward_batch`, and the lm_head alone for N tokens. Best of 5.
//! Where the CPU has AMX-INT8, the step is timed with the AVX register
//! tiles and again with the AMX tiles.
//!
//! cargo run --release -p trine-engine --example batch_step -- MODEL.gguf 1,8,32

use std::io::Write as _;
use std::time::{Duration, Instant};

use trine_engine::kernels::amx;
use trine_engine::model::{Input, Logits, Model, Step};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(path), counts) = (args.next(), args.next()) else {
        return Err("usage: batch_step MODEL.gguf [N,N,...]".into());
    };
    let counts: Vec<usize> = counts
        .as_deref()
        .unwrap_or("1,8,32")
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let model = Model::open(std::path::Path::new(&path))?;
    let lm_head = model
        .lm_head
        .clone()
        .ok_or("the model has no lm_head (a later stage?)")?;
    let mut stdout = std::io::stdout().lock();
    let modes: &[bool] = if amx::usable() {
        &[false, true]
    } else {
        &[false]
    };
    writeln!(
        stdout,
        "sequences  step (best of 5)  step with AMX  lm_head alone"
    )?;
    for n in counts {
        let mut caches: Vec<_> = (0..n).map(|_| model.new_cache(8)).collect();
        for c in &mut caches {
            model.forward(Input::Tokens(&[1, 2, 3]), c, Logits::Last)?;
        }
        let tokens: Vec<[u32; 1]> = (0..n).map(|i| [i as u32 % 100 + 5]).collect();
        let mut bests = Vec::new();
        for &on in modes {
            amx::set_enabled(on);
            let mut best = Duration::MAX;
            for _ in 0..5 {
                let mut steps: Vec<Step<'_>> = caches
                    .iter_mut()
                    .zip(&tokens)
                    .map(|(cache, t)| Step {
                        input: Input::Tokens(t),
                        cache,
                        logits: Logits::Last,
                    })
                    .collect();
                let t = Instant::now();
                for r in model.forward_batch(&mut steps) {
                    r?;
                }
                best = best.min(t.elapsed());
                drop(steps);
                for c in &mut caches {
                    c.truncate(3);
                }
            }
            bests.push(best);
        }
        let (best, with_amx) = (
            bests[0],
            bests.get(1).map_or("-".into(), |d| format!("{d:.1?}")),
        );
        let x = vec![0.1f32; n * model.config.hidden];
        let mut out = vec![0f32; n * model.config.vocab];
        let mut head = Duration::MAX;
        for _ in 0..5 {
            let t = Instant::now();
            lm_head.matmul(&x, &mut out);
            head = head.min(t.elapsed());
        }
        writeln!(
            stdout,
            "{n:>9}  {best:>15.1?}  {with_amx:>13}  {head:>13.1?}"
        )?;
    }
    Ok(())
}
