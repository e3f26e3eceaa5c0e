//! The CVAE generator: prior network `p(z|c)` and decoder `p(x|z,c)`.
//!
//! Two runtimes, chosen with the encoder's ([`Runtime`]): sglora's fixed-order kernels
//! ([`crate::kernels`], bit-identical on every platform; the weights are read out of the bundle's
//! ONNX files by node name) or tract (runs any ONNX graph with these inputs and outputs).
//!
//! Inputs are in the bundle's normalised parameter space: `mu_star = (μ* − mean)/std`,
//! `std_star = sqrt(σ*²)/std`. The prior returns the condition `c` and the Gaussian `p(z|c)`;
//! `z = z_mean + noise_scale · exp(z_logvar/2) · ε(seed)`; the decoder maps `(z, c, mu_star,
//! std_star)` to a normalised flat LoRA vector.

use tract_onnx::prelude::*;

use crate::bundle::Bundle;
use crate::encoder::{load_onnx, Runner, Runtime};
use crate::error::{unsupported, Unsupported};
use crate::error::{Error, Result};
use crate::kernels::{gelu, Linear};
use crate::onnx_graph::Graph;
use crate::prior::Prior;
use crate::rng::Rng;

/// The two networks, in one of the runtimes.
enum Nets {
    Native(Box<Native>),
    Tract { prior: Runner, decoder: Runner },
}

/// The CVAE in fixed-order kernels, as the pipeline exports it (`models/BUNDLE.md`):
/// prior: `c = [μ*·P, s*·P, ln(mean(s*) + eps)]`, `[z_mean, z_logvar] = MLP(c)` with the log-variance
/// clipped; decoder: `[k, g] = MLP([z, c])`, `x = gain·(tanh(g)·a + b)·μ* + s* ⊙ (k·B)`.
struct Native {
    project: Linear,
    eps: f32,
    prior: [Linear; 2],
    clip: (f32, f32),
    dec: [Linear; 2],
    basis: Linear,
    tanh_scale: f32,
    tanh_shift: f32,
    gain: f32,
}

impl Native {
    fn load(
        prior: &[u8],
        decoder: &[u8],
        d: usize,
        z: usize,
        c: usize,
    ) -> Result<Native, Unsupported> {
        let p = Graph::parse(prior)?;
        let project = p.matmul("/MatMul", None)?;
        if project.inputs() != d {
            return Err(unsupported!(
                "projection takes {} values, expected {d}",
                project.inputs()
            ));
        }
        p.node("/ReduceMean", "ReduceMean")?;
        p.node("/Log", "Log")?;
        p.node("/prior/prior.1/Erf", "Erf")?;
        let eps = p.const_operand(p.node("/Add", "Add")?)?;
        let clip = p.node("/Clip", "Clip")?;
        let clip = (p.scalar(p.input(clip, 1)?)?, p.scalar(p.input(clip, 2)?)?);
        let prior = [
            p.gemm("/prior/prior.0/Gemm")?,
            p.gemm("/prior/prior.2/Gemm")?,
        ];
        if 2 * project.outputs() + 1 != c
            || prior[0].inputs() != c
            || prior[1].inputs() != prior[0].outputs()
            || prior[1].outputs() != 2 * z
        {
            return Err(unsupported!(
                "prior network shapes do not match cond_dim {c} and z_dim {z}"
            ));
        }
        let g = Graph::parse(decoder)?;
        g.node("/dec/dec.1/Erf", "Erf")?;
        g.node("/Tanh", "Tanh")?;
        let dec = [g.gemm("/dec/dec.0/Gemm")?, g.gemm("/dec/dec.2/Gemm")?];
        let basis = g.matmul("/MatMul", None)?;
        if dec[0].inputs() != z + c
            || dec[1].inputs() != dec[0].outputs()
            || dec[1].outputs() != basis.inputs() + 1
            || basis.outputs() != d
        {
            return Err(unsupported!(
                "decoder shapes do not match z_dim {z}, cond_dim {c} and {d} parameters"
            ));
        }
        Ok(Native {
            project,
            eps,
            prior,
            clip,
            tanh_scale: g.const_operand(g.node("/Mul", "Mul")?)?,
            tanh_shift: g.const_operand(g.node("/Add", "Add")?)?,
            gain: g.const_operand(g.node("/Mul_1", "Mul")?)?,
            dec,
            basis,
        })
    }

    fn prior(&self, mu: &[f32], sd: &[f32], z: usize) -> LatentPrior {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        self.project.forward(mu, &mut a);
        self.project.forward(sd, &mut b);
        let mut sum = 0.0f32;
        for &v in sd {
            sum += v;
        }
        let mut cond = a;
        cond.extend_from_slice(&b);
        cond.push(libm::logf(sum / sd.len() as f32 + self.eps));
        let (mut h, mut out) = (Vec::new(), Vec::new());
        self.prior[0].forward(&cond, &mut h);
        gelu(&mut h);
        self.prior[1].forward(&h, &mut out);
        let (lo, hi) = self.clip;
        LatentPrior {
            z_mean: out[..z].to_vec(),
            z_logvar: out[z..2 * z].iter().map(|v| v.max(lo).min(hi)).collect(),
            cond,
        }
    }

    fn decode(&self, z: &[f32], cond: &[f32], mu: &[f32], sd: &[f32]) -> Vec<f32> {
        let mut zc = z.to_vec();
        zc.extend_from_slice(cond);
        let (mut h, mut out, mut corr) = (Vec::new(), Vec::new(), Vec::new());
        self.dec[0].forward(&zc, &mut h);
        gelu(&mut h);
        self.dec[1].forward(&h, &mut out);
        let k = self.basis.inputs();
        let s = self.gain * (libm::tanhf(out[k]) * self.tanh_scale + self.tanh_shift);
        self.basis.forward(&out[..k], &mut corr);
        mu.iter()
            .zip(sd)
            .zip(&corr)
            .map(|((&m, &d), &c)| s * m + d * c)
            .collect()
    }
}

/// The CVAE's parameter space: flat LoRA vectors are normalised per coordinate by the expert
/// repository's mean and scale (stored beside the experts in `experts.safetensors`).
#[derive(Debug, Clone)]
pub struct Normalisation {
    mean: Vec<f32>,
    std: Vec<f32>,
}

impl Normalisation {
    /// From the per-coordinate mean and scale; every scale must be finite and positive.
    pub fn new(mean: Vec<f32>, std: Vec<f32>) -> Result<Normalisation> {
        if mean.len() != std.len() {
            return Err(Error::InvalidOption(format!(
                "normalisation mean has {} values and scale {}",
                mean.len(),
                std.len()
            )));
        }
        if std.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
            return Err(Error::InvalidOption(
                "norm_std must be finite and positive".into(),
            ));
        }
        Ok(Normalisation { mean, std })
    }

    /// The identity (mean 0, scale 1) over `dim` coordinates.
    pub fn identity(dim: usize) -> Normalisation {
        Normalisation {
            mean: vec![0.0; dim],
            std: vec![1.0; dim],
        }
    }

    /// Per-coordinate mean.
    pub fn mean(&self) -> &[f32] {
        &self.mean
    }

    /// Per-coordinate scale (finite, positive).
    pub fn std(&self) -> &[f32] {
        &self.std
    }

    /// The prior in the CVAE's space: `((μ* − mean)/std, sqrt(σ*²)/std)`.
    pub fn normalise(&self, prior: &Prior) -> (Vec<f32>, Vec<f32>) {
        let (m, s) = (&self.mean, &self.std);
        let mu = prior
            .mean
            .iter()
            .zip(m)
            .zip(s)
            .map(|((x, m), s)| (x - m) / s)
            .collect();
        let sd = prior
            .var
            .iter()
            .zip(s)
            .map(|(v, s)| v.max(0.0).sqrt() / s)
            .collect();
        (mu, sd)
    }

    /// Back to parameter space: `x · std + mean`.
    pub fn denormalise(&self, x_n: &[f32]) -> Vec<f32> {
        x_n.iter()
            .zip(&self.mean)
            .zip(&self.std)
            .map(|((x, m), s)| x * s + m)
            .collect()
    }
}

/// The loaded CVAE.
pub struct Cvae {
    nets: Nets,
    norm: Normalisation,
    dim: usize,
    z_dim: usize,
    cond_dim: usize,
}

impl std::fmt::Debug for Cvae {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cvae")
            .field("dim", &self.dim)
            .field("z_dim", &self.z_dim)
            .finish()
    }
}

/// What the prior network says for a condition.
#[derive(Debug, Clone)]
pub struct LatentPrior {
    /// Condition vector `c`.
    pub cond: Vec<f32>,
    /// Mean of `p(z|c)`.
    pub z_mean: Vec<f32>,
    /// Log-variance of `p(z|c)`.
    pub z_logvar: Vec<f32>,
}

fn to_vec(v: &TValue, len: usize, what: &str) -> TractResult<Vec<f32>> {
    let view = v.to_plain_array_view::<f32>()?;
    if view.len() != len {
        return Err(TractError::msg(format!(
            "{what} has {} values, expected {len}",
            view.len()
        )));
    }
    Ok(view.iter().copied().collect())
}

impl Cvae {
    /// Load both networks of a bundle, for sglora's kernels ([`Runtime::is_native`]) or tract
    /// ([`Runtime::Auto`] is resolved here), with the parameter space's normalisation.
    pub fn load(bundle: &Bundle, runtime: Runtime, norm: Normalisation) -> Result<Cvae> {
        let m = &bundle.manifest;
        let (d, z, c) = (m.lora.flat_dim, m.cvae.z_dim, m.cvae.cond_dim);
        if norm.mean.len() != d {
            return Err(Error::bundle(
                bundle.path(&m.experts.file),
                format!(
                    "the normalisation has {} values, expected {d}",
                    norm.mean.len()
                ),
            ));
        }
        if runtime.is_native() {
            let prior = bundle.read(&m.cvae.prior_file)?;
            let decoder = bundle.read(&m.cvae.decoder_file)?;
            let native = Native::load(&prior, &decoder, d, z, c).map_err(|e| {
                Error::bundle(
                    bundle.path(&m.cvae.decoder_file),
                    format!(
                        "the CVAE ({} + {}) cannot be run by sglora's kernels: {e}; set [model] \
                         encoder_weights = \"fp32\" to run it through tract instead",
                        m.cvae.prior_file, m.cvae.decoder_file
                    ),
                )
            })?;
            return Ok(Cvae {
                nets: Nets::Native(Box::new(native)),
                norm,
                dim: d,
                z_dim: z,
                cond_dim: c,
            });
        }
        let f = f32::datum_type();
        let prior = load_onnx(
            bundle,
            &m.cvae.prior_file,
            &[(f, vec![Some(1), Some(d)]), (f, vec![Some(1), Some(d)])],
            "cvae prior",
            Runtime::Fp32,
        )?;
        let decoder = load_onnx(
            bundle,
            &m.cvae.decoder_file,
            &[
                (f, vec![Some(1), Some(z)]),
                (f, vec![Some(1), Some(c)]),
                (f, vec![Some(1), Some(d)]),
                (f, vec![Some(1), Some(d)]),
            ],
            "cvae decoder",
            Runtime::Fp32,
        )?;
        Ok(Cvae {
            nets: Nets::Tract { prior, decoder },
            norm,
            dim: d,
            z_dim: z,
            cond_dim: c,
        })
    }

    /// Run the prior network.
    pub fn prior(&self, mu_star: &[f32], std_star: &[f32]) -> Result<LatentPrior> {
        self.check(mu_star, std_star)?;
        let prior = match &self.nets {
            Nets::Native(n) => return Ok(n.prior(mu_star, std_star, self.z_dim)),
            Nets::Tract { prior, .. } => prior,
        };
        let run = || -> TractResult<LatentPrior> {
            let out = prior.run(tvec!(
                Tensor::from_shape(&[1, self.dim], mu_star)?.into(),
                Tensor::from_shape(&[1, self.dim], std_star)?.into()
            ))?;
            Ok(LatentPrior {
                cond: to_vec(&out[0], self.cond_dim, "cond")?,
                z_mean: to_vec(&out[1], self.z_dim, "z_mean")?,
                z_logvar: to_vec(&out[2], self.z_dim, "z_logvar")?,
            })
        };
        run().map_err(|e| Error::model("cvae prior", e))
    }

    /// Draw `z` from `p(z|c)` with the portable RNG (`noise_scale` 0 gives the mean).
    pub fn sample_z(&self, p: &LatentPrior, seed: u64, noise_scale: f64) -> Vec<f32> {
        let eps = Rng::new(seed).normals(self.z_dim);
        p.z_mean
            .iter()
            .zip(&p.z_logvar)
            .zip(eps)
            .map(|((m, lv), e)| {
                (f64::from(*m) + noise_scale * libm::exp(0.5 * f64::from(*lv)) * e) as f32
            })
            .collect()
    }

    /// Run the decoder: normalised flat LoRA vector.
    pub fn decode(
        &self,
        z: &[f32],
        cond: &[f32],
        mu_star: &[f32],
        std_star: &[f32],
    ) -> Result<Vec<f32>> {
        self.check(mu_star, std_star)?;
        if z.len() != self.z_dim || cond.len() != self.cond_dim {
            return Err(Error::InvalidOption(format!(
                "z/cond sizes {}/{} do not match the bundle",
                z.len(),
                cond.len()
            )));
        }
        let decoder = match &self.nets {
            Nets::Native(n) => Ok(n.decode(z, cond, mu_star, std_star)),
            Nets::Tract { decoder, .. } => Err(decoder),
        };
        let run = |decoder: &Runner| -> TractResult<Vec<f32>> {
            let out = decoder.run(tvec!(
                Tensor::from_shape(&[1, self.z_dim], z)?.into(),
                Tensor::from_shape(&[1, self.cond_dim], cond)?.into(),
                Tensor::from_shape(&[1, self.dim], mu_star)?.into(),
                Tensor::from_shape(&[1, self.dim], std_star)?.into()
            ))?;
            to_vec(&out[0], self.dim, "decoder output")
        };
        let x = match decoder {
            Ok(x) => x,
            Err(d) => run(d).map_err(|e| Error::model("cvae decoder", e))?,
        };
        if x.iter().any(|v| !v.is_finite()) {
            return Err(Error::model(
                "cvae decoder",
                "produced NaN or infinite parameters",
            ));
        }
        Ok(x)
    }

    fn check(&self, mu: &[f32], sd: &[f32]) -> Result<()> {
        if mu.len() != self.dim || sd.len() != self.dim {
            return Err(Error::InvalidOption(format!(
                "prior vectors have {}/{} values, expected {}",
                mu.len(),
                sd.len(),
                self.dim
            )));
        }
        Ok(())
    }

    /// The parameter space's normalisation.
    pub fn normalisation(&self) -> &Normalisation {
        &self.norm
    }

    /// Latent size.
    pub fn z_dim(&self) -> usize {
        self.z_dim
    }
}
