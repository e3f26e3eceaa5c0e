//! The CVAE generator: prior network `p(z|c)` and decoder `p(x|z,c)`, run by tract.
//!
//! Inputs are in the bundle's normalised parameter space: `mu_star = (μ* − mean)/std`,
//! `std_star = sqrt(σ*²)/std`. The prior returns the condition `c` and the Gaussian `p(z|c)`;
//! `z = z_mean + noise_scale · exp(z_logvar/2) · ε(seed)`; the decoder maps `(z, c, mu_star,
//! std_star)` to a normalised flat LoRA vector.

use tract_onnx::prelude::*;

use crate::bundle::Bundle;
use crate::encoder::{load_onnx, Runner, WeightPrecision};
use crate::error::{Error, Result};
use crate::rng::Rng;

/// Loaded CVAE plans.
pub struct Cvae {
    prior: Runner,
    decoder: Runner,
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
        anyhow::bail!("{what} has {} values, expected {len}", view.len());
    }
    Ok(view.iter().copied().collect())
}

impl Cvae {
    /// Load both networks of a bundle.
    pub fn load(bundle: &Bundle) -> Result<Cvae> {
        let m = &bundle.manifest;
        let (d, z, c) = (m.lora.flat_dim, m.cvae.z_dim, m.cvae.cond_dim);
        let f = f32::datum_type();
        let prior = load_onnx(
            bundle,
            &m.cvae.prior_file,
            &[(f, vec![Some(1), Some(d)]), (f, vec![Some(1), Some(d)])],
            "cvae prior",
            WeightPrecision::F32,
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
            WeightPrecision::F32,
        )?;
        Ok(Cvae {
            prior,
            decoder,
            dim: d,
            z_dim: z,
            cond_dim: c,
        })
    }

    /// Run the prior network.
    pub fn prior(&self, mu_star: &[f32], std_star: &[f32]) -> Result<LatentPrior> {
        self.check(mu_star, std_star)?;
        let run = || -> TractResult<LatentPrior> {
            let out = self.prior.run(tvec!(
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
                (f64::from(*m) + noise_scale * (0.5 * f64::from(*lv)).exp() * e) as f32
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
        let run = || -> TractResult<Vec<f32>> {
            let out = self.decoder.run(tvec!(
                Tensor::from_shape(&[1, self.z_dim], z)?.into(),
                Tensor::from_shape(&[1, self.cond_dim], cond)?.into(),
                Tensor::from_shape(&[1, self.dim], mu_star)?.into(),
                Tensor::from_shape(&[1, self.dim], std_star)?.into()
            ))?;
            to_vec(&out[0], self.dim, "decoder output")
        };
        let x = run().map_err(|e| Error::model("cvae decoder", e))?;
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

    /// Latent size.
    pub fn z_dim(&self) -> usize {
        self.z_dim
    }
}
