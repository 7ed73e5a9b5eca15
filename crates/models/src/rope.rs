//! Rotary position embedding tables.
//!
//! Frequencies and angles are computed in f64 and rounded once to f32, so the
//! table is as exact as f32 allows at every position (Hugging Face computes
//! `inv_freq` and the angles in f32, which drifts by up to ~1e-3 rad at
//! position 8k; the difference is far below what changes a logit).

use crate::config::{ModelConfig, RopeScaling};

/// `inv_freq[i] = 1 / theta^(2i / head_dim)` for `i < head_dim / 2`, after scaling.
pub fn inverse_frequencies(config: &ModelConfig) -> Vec<f64> {
    let dim = config.head_dim;
    let base: Vec<f64> =
        (0..dim / 2).map(|i| 1.0 / config.rope_theta.powf((2 * i) as f64 / dim as f64)).collect();
    match &config.rope_scaling {
        RopeScaling::None => base,
        RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
        RopeScaling::PerFrequency(divisors) => {
            base.iter().zip(divisors.iter().chain(std::iter::repeat(&1.0))).map(|(f, d)| f / d).collect()
        }
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            let low_freq_wavelen = original_max_position_embeddings / low_freq_factor;
            let high_freq_wavelen = original_max_position_embeddings / high_freq_factor;
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < high_freq_wavelen {
                        f
                    } else if wavelen > low_freq_wavelen {
                        f / factor
                    } else {
                        let smooth = (original_max_position_embeddings / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

/// The `[max_positions, head_dim]` table the backend's `rotary_and_cache`
/// reads: row `p` holds `cos(p * inv_freq)` then `sin(p * inv_freq)`.
pub fn cos_sin_table(config: &ModelConfig, max_positions: usize) -> Vec<f32> {
    let inv_freq = inverse_frequencies(config);
    let half = inv_freq.len();
    let mut table = vec![0f32; max_positions * 2 * half];
    for (p, row) in table.chunks_exact_mut(2 * half).enumerate() {
        for (i, &f) in inv_freq.iter().enumerate() {
            let angle = p as f64 * f;
            row[i] = angle.cos() as f32;
            row[half + i] = angle.sin() as f32;
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Architecture;

    fn config(scaling: RopeScaling) -> ModelConfig {
        ModelConfig {
            architecture: Architecture::Llama,
            hidden_size: 64,
            intermediate_size: 128,
            num_layers: 1,
            num_attention_heads: 4,
            num_kv_heads: 2,
            head_dim: 16,
            vocab_size: 10,
            max_position_embeddings: 64,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_scaling: scaling,
            tie_word_embeddings: true,
            qkv_bias: false,
            o_bias: false,
            sliding_window: None,
            first_sliding_layer: 0,
            bos_token_id: None,
            eos_token_ids: vec![],
            quantization: None,
        }
    }

    #[test]
    fn table_rows_are_cos_then_sin() {
        let c = config(RopeScaling::None);
        let t = cos_sin_table(&c, 4);
        assert_eq!(t.len(), 4 * 16);
        assert_eq!(&t[..8], &[1.0; 8]);
        assert_eq!(&t[8..16], &[0.0; 8]);
        // Position 3, frequency 0 (inv_freq 1): cos(3), sin(3).
        assert!((t[3 * 16] - 3f32.cos()).abs() < 1e-7);
        assert!((t[3 * 16 + 8] - 3f32.sin()).abs() < 1e-7);
    }

    #[test]
    fn linear_scaling_divides_every_frequency() {
        let base = inverse_frequencies(&config(RopeScaling::None));
        let scaled = inverse_frequencies(&config(RopeScaling::Linear { factor: 4.0 }));
        for (b, s) in base.iter().zip(&scaled) {
            assert!((b / 4.0 - s).abs() < 1e-15);
        }
    }

    #[test]
    fn llama3_keeps_high_and_divides_low_frequencies() {
        let base = inverse_frequencies(&config(RopeScaling::None));
        let scaled = inverse_frequencies(&config(RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64.0,
        }));
        // Wavelength 2π < 16: kept. The lowest frequency's wavelength is far above 64: divided.
        assert_eq!(scaled[0], base[0]);
        assert!((scaled[7] - base[7] / 8.0).abs() < 1e-15);
        // In between, monotone in the frequency order.
        assert!(scaled.windows(2).all(|w| w[0] > w[1]));
    }
}
