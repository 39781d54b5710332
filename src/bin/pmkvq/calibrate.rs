//! `pmkvq calibrate`.

use super::*;

fn data_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, Failure> {
    fn walk(p: &std::path::Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
        if p.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(p)?.filter_map(|e| e.ok().map(|e| e.path())).collect();
            entries.sort();
            for e in entries {
                walk(&e, out)?;
            }
        } else if p.extension().is_some_and(|x| x == "txt" || x == "tex") {
            out.push(p.to_path_buf());
        }
        Ok(())
    }
    let mut out = Vec::new();
    for p in paths {
        if !p.exists() {
            return Err(fail(
                EX_NOINPUT,
                anyhow::anyhow!("calibration data {} not found", p.display()),
            ));
        }
        if p.is_file() {
            out.push(p.clone());
        } else {
            walk(p, &mut out).map_err(|e| fail(EX_NOINPUT, anyhow::anyhow!("{}: {e}", p.display())))?;
        }
    }
    if out.is_empty() {
        return Err(fail(
            EX_NOINPUT,
            anyhow::anyhow!("no .txt or .tex files in the calibration data"),
        ));
    }
    Ok(out)
}

pub(crate) fn cmd_calibrate(a: CalibrateArgs) -> Result<(), Failure> {
    use indicatif::{ProgressBar, ProgressStyle};
    use pmkvq::calib::{calibrate, CalibConfig, Stage};
    let (model, tok) = load(&a.model)?;
    let cfg = CalibConfig {
        samples: a.samples,
        seq_len: a.seq_len,
        effective_len: a.effective_len,
        choices: a.choices.clone(),
        avg_bits: a.avg_bits,
        alpha_bits: a.alpha_bits,
        data: data_files(&a.data)?,
        seed: a.seed,
        rotate: !a.no_rotate,
        fit: a.fit,
    };
    let sha = fetch::model_sha256(&model.source).map_err(|e| fail(EX_NOINPUT, e.into()))?;
    let started = std::time::Instant::now();
    let style = ProgressStyle::with_template("{prefix:>12} [{bar:40}] {pos}/{len} {elapsed_precise} eta {eta}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    let mut bar: Option<(Stage, ProgressBar)> = None;
    let mut progress = |stage: Stage, done: usize, total: usize| {
        if bar.as_ref().is_none_or(|(s, _)| *s != stage) {
            if let Some((_, b)) = bar.take() {
                b.finish();
            }
            let b = ProgressBar::new(total as u64)
                .with_style(style.clone())
                .with_prefix(match stage {
                    Stage::Reference => "reference",
                    Stage::Sensitivity => "sensitivity",
                    Stage::AlphaSearch => "alpha search",
                });
            bar = Some((stage, b));
        }
        if let Some((_, b)) = &bar {
            b.set_position(done as u64);
        }
    };
    let profile = calibrate(&model, &tok, &sha, &cfg, &mut progress).map_err(|e| match e {
        pmkvq::calib::run::CalibError::Setting(_) | pmkvq::calib::run::CalibError::NotEnoughData { .. } => {
            fail(EX_USAGE, e.into())
        }
        other => fail(EX_SOFTWARE, other.into()),
    })?;
    if let Some((_, b)) = bar.take() {
        b.finish();
    }
    if let Some(dir) = a.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    profile.save(&a.out).map_err(|e| fail(EX_SOFTWARE, e.into()))?;
    let mut out = std::io::stdout().lock();
    let w = |b: u32| profile.widths.iter().position(|&x| x == b);
    writeln!(out, "| layer | KL @2 bits | KL @4 bits | Δloss @2 | bits | share | α |")?;
    writeln!(out, "|---|---|---|---|---|---|---|")?;
    for l in 0..profile.layers {
        let kl = |b: u32| w(b).map_or("—".to_string(), |i| format!("{:.4}", profile.sensitivity_kl[l][i]));
        let dl = w(2).map_or("—".to_string(), |i| format!("{:+.4}", profile.sensitivity_loss[l][i]));
        writeln!(
            out,
            "| {l} | {} | {} | {dl} | {} | {:.4} | {:.2} |",
            kl(2),
            kl(4),
            profile.bits[l],
            profile.shares[l],
            profile.alpha[l]
        )?;
    }
    eprintln!("wrote {} in {:.1} s", a.out.display(), started.elapsed().as_secs_f64());
    Ok(())
}
