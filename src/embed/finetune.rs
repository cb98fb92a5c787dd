//! Gradients of one encoder layer, so `routellm train bert` can fine-tune the encoder's top
//! layer together with the classification head.
//!
//! Why only the top layer: the states entering it do not change while it trains, so they
//! are computed once for every training prompt, and an epoch costs one layer's forward and
//! backward pass instead of six. The forward pass here is the served one (same fused
//! Q/K/V with the attention scale folded in, same GELU and softmax) but keeps what the
//! backward pass needs; a test checks every parameter's gradient against finite differences.

use ndarray::linalg::general_mat_mul;
use ndarray::{Array2, ArrayView1, ArrayView2, ArrayViewMut2, Axis, Slice};
use rayon::prelude::*;

use super::EmbedError;
use super::encoder::{Dense, Layer, LayerNorm, erf, gelu, numeric, softmax, split_product};

/// A layer being trained, and the number of attention heads it splits into.
#[derive(Clone)]
pub struct TrainableLayer {
    pub(super) layer: Layer,
    pub(super) heads: usize,
}

/// What the forward pass keeps for the backward pass, for one packed batch.
pub struct Trace {
    input: Array2<f32>,
    query_key_value: Array2<f32>,
    /// Per sequence, per head: the attention weights (`length x length`).
    attention: Vec<Vec<Array2<f32>>>,
    context: Array2<f32>,
    attention_normalised: Normalised,
    attended: Array2<f32>,
    pre_activation: Array2<f32>,
    activation: Array2<f32>,
    output_normalised: Normalised,
    lengths: Vec<usize>,
}

/// A layer norm's input after centring and scaling (before gamma and beta), and the scale.
struct Normalised {
    rows: Array2<f32>,
    inverse_deviation: Vec<f32>,
}

/// The loss's gradient for every parameter of a layer, in [`TrainableLayer::parameters_mut`]'s order.
pub struct LayerGradient {
    pub parts: Vec<Vec<f32>>,
}

/// `a · b` on both cores, as the served dense products.
fn product(a: &ArrayView2<'_, f32>, b: &ArrayView2<'_, f32>) -> Array2<f32> {
    let mut out = Array2::<f32>::zeros((a.nrows(), b.ncols()));
    split_product(a, b, out.view_mut());
    out
}

fn dense(input: &ArrayView2<'_, f32>, layer: &Dense) -> Array2<f32> {
    let mut out = product(input, &layer.weight.view());
    out += &ArrayView1::from(&layer.bias);
    out
}

/// `dW = xᵀ·dy` and `db = Σ dy` into the two gradients.
fn dense_gradients(
    input: &ArrayView2<'_, f32>,
    d_output: &ArrayView2<'_, f32>,
    weight_gradient: &mut Vec<f32>,
    bias_gradient: &mut Vec<f32>,
) {
    *weight_gradient = product(&input.t(), d_output).into_iter().collect();
    *bias_gradient = d_output.sum_axis(Axis(0)).to_vec();
}

/// [`dense_gradients`], and the input's gradient `dx = dy·Wᵀ`.
fn dense_backward(
    input: &ArrayView2<'_, f32>,
    d_output: &ArrayView2<'_, f32>,
    layer: &Dense,
    weight_gradient: &mut Vec<f32>,
    bias_gradient: &mut Vec<f32>,
) -> Array2<f32> {
    dense_gradients(input, d_output, weight_gradient, bias_gradient);
    product(d_output, &layer.weight.t())
}

fn normalise(rows: Array2<f32>, norm: &LayerNorm) -> (Array2<f32>, Normalised) {
    let mut centred = rows;
    let width = centred.ncols();
    #[allow(clippy::cast_precision_loss)]
    let inverse_width = 1.0 / width as f32;
    let mut inverse_deviation = Vec::with_capacity(centred.nrows());
    for mut row in centred.rows_mut() {
        let mean = row.sum() * inverse_width;
        row -= mean;
        let variance = row.iter().map(|v| v * v).sum::<f32>() * inverse_width;
        let scale = 1.0 / (variance + norm.eps).sqrt();
        row *= scale;
        inverse_deviation.push(scale);
    }
    let mut out = centred.clone();
    out *= &ArrayView1::from(&norm.gamma);
    out += &ArrayView1::from(&norm.beta);
    (
        out,
        Normalised {
            rows: centred,
            inverse_deviation,
        },
    )
}

fn normalise_backward(
    d_output: &ArrayView2<'_, f32>,
    saved: &Normalised,
    norm: &LayerNorm,
    gamma_gradient: &mut Vec<f32>,
    beta_gradient: &mut Vec<f32>,
) -> Array2<f32> {
    *gamma_gradient = (d_output * &saved.rows).sum_axis(Axis(0)).to_vec();
    *beta_gradient = d_output.sum_axis(Axis(0)).to_vec();
    let mut d_input = d_output * &ArrayView1::from(&norm.gamma);
    #[allow(clippy::cast_precision_loss)]
    let inverse_width = 1.0 / d_input.ncols() as f32;
    for ((mut d_row, normalised), scale) in d_input
        .rows_mut()
        .into_iter()
        .zip(saved.rows.rows())
        .zip(&saved.inverse_deviation)
    {
        let mean = d_row.sum() * inverse_width;
        let along = d_row.iter().zip(normalised).map(|(d, x)| d * x).sum::<f32>() * inverse_width;
        for (d, x) in d_row.iter_mut().zip(normalised) {
            *d = scale * (*d - mean - x * along);
        }
    }
    d_input
}

/// `d gelu(x) / dx = Φ(x) + x·φ(x)`.
fn gelu_derivative(x: f32) -> f32 {
    let density = (-0.5 * x * x).exp() * 0.398_942_3;
    0.5 * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2)) + x * density
}

/// Row offsets of each sequence in a packed batch.
fn offsets(lengths: &[usize]) -> Vec<usize> {
    lengths
        .iter()
        .scan(0, |first, length| {
            let start = *first;
            *first += length;
            Some(start)
        })
        .collect()
}

impl TrainableLayer {
    fn hidden(&self) -> usize {
        self.layer.attention_output.bias.len()
    }

    /// The layer's output for packed `states` (`[tokens, hidden]`, sequences of `lengths`),
    /// and what the backward pass needs.
    pub fn forward(&self, states: &[f32], lengths: &[usize]) -> Result<(Vec<f32>, Trace), EmbedError> {
        let hidden = self.hidden();
        let total: usize = lengths.iter().sum();
        let input = Array2::from_shape_vec((total, hidden), states.to_vec()).map_err(numeric)?;
        let query_key_value = dense(&input.view(), &self.layer.query_key_value);
        let width = hidden / self.heads;
        let starts = offsets(lengths);
        let per_sequence: Vec<(Vec<Array2<f32>>, Array2<f32>)> = starts
            .par_iter()
            .zip(lengths)
            .map(|(&start, &length)| {
                let rows = query_key_value.slice_axis(Axis(0), Slice::from(start..start + length));
                let mut context = Array2::<f32>::zeros((length, hidden));
                let weights = (0..self.heads)
                    .map(|head| {
                        let part = |offset: usize| {
                            rows.slice_axis(Axis(1), Slice::from(offset + head * width..offset + (head + 1) * width))
                        };
                        let mut scores = part(0).dot(&part(hidden).t());
                        for mut row in scores.rows_mut() {
                            if let Some(row) = row.as_slice_mut() {
                                softmax(row);
                            }
                        }
                        let mut out = context.slice_axis_mut(Axis(1), Slice::from(head * width..(head + 1) * width));
                        general_mat_mul(1.0, &scores, &part(2 * hidden), 0.0, &mut out);
                        scores
                    })
                    .collect();
                (weights, context)
            })
            .collect();
        let mut context = Array2::<f32>::zeros((total, hidden));
        let mut attention = Vec::with_capacity(lengths.len());
        for ((weights, part), (&start, &length)) in per_sequence.into_iter().zip(starts.iter().zip(lengths)) {
            context
                .slice_axis_mut(Axis(0), Slice::from(start..start + length))
                .assign(&part);
            attention.push(weights);
        }
        let mut attended = dense(&context.view(), &self.layer.attention_output);
        attended += &input;
        let (attended, attention_normalised) = normalise(attended, &self.layer.attention_norm);
        let pre_activation = dense(&attended.view(), &self.layer.intermediate);
        let activation = pre_activation.mapv(gelu);
        let mut output = dense(&activation.view(), &self.layer.output);
        output += &attended;
        let (output, output_normalised) = normalise(output, &self.layer.output_norm);
        let trace = Trace {
            input,
            query_key_value,
            attention,
            context,
            attention_normalised,
            attended,
            pre_activation,
            activation,
            output_normalised,
            lengths: lengths.to_vec(),
        };
        Ok((output.into_iter().collect(), trace))
    }

    /// The gradient of every parameter given the loss's gradient with respect to the
    /// layer's output (`[tokens, hidden]`, packed like the forward pass's input).
    pub fn backward(&self, trace: &Trace, d_output: &[f32]) -> Result<LayerGradient, EmbedError> {
        let hidden = self.hidden();
        let total = trace.input.nrows();
        let d_output = ArrayView2::from_shape((total, hidden), d_output).map_err(numeric)?;
        let mut parts: Vec<Vec<f32>> = vec![Vec::new(); 12];
        let [
            projection_weight,
            projection_bias,
            attention_output_weight,
            attention_output_bias,
            attention_gamma,
            attention_beta,
            intermediate_weight,
            intermediate_bias,
            output_weight,
            output_bias,
            output_gamma,
            output_beta,
        ] = &mut parts[..]
        else {
            return Err(EmbedError::Embed("a layer has twelve parameters".into()));
        };
        // Output norm, then the feed-forward block and its residual.
        let d_sum = normalise_backward(
            &d_output,
            &trace.output_normalised,
            &self.layer.output_norm,
            output_gamma,
            output_beta,
        );
        let mut d_activation = dense_backward(
            &trace.activation.view(),
            &d_sum.view(),
            &self.layer.output,
            output_weight,
            output_bias,
        );
        d_activation.zip_mut_with(&trace.pre_activation, |d, &x| *d *= gelu_derivative(x));
        let mut d_attended = dense_backward(
            &trace.attended.view(),
            &d_activation.view(),
            &self.layer.intermediate,
            intermediate_weight,
            intermediate_bias,
        );
        d_attended += &d_sum;
        // Attention norm, then the attention output and its residual (the input's gradient
        // through the residual is not needed: the layers below are frozen).
        let d_attention_sum = normalise_backward(
            &d_attended.view(),
            &trace.attention_normalised,
            &self.layer.attention_norm,
            attention_gamma,
            attention_beta,
        );
        let d_context = dense_backward(
            &trace.context.view(),
            &d_attention_sum.view(),
            &self.layer.attention_output,
            attention_output_weight,
            attention_output_bias,
        );
        let d_projections = self.attention_backward(trace, &d_context);
        dense_gradients(
            &trace.input.view(),
            &d_projections.view(),
            projection_weight,
            projection_bias,
        );
        Ok(LayerGradient { parts })
    }

    /// Through softmax attention, per sequence and head: `dP = dC·Vᵀ`, `dV = Pᵀ·dC`,
    /// `dS = P ⊙ (dP − rowsum(dP ⊙ P))`, `dQ = dS·K`, `dK = dSᵀ·Q`.
    fn attention_backward(&self, trace: &Trace, d_context: &Array2<f32>) -> Array2<f32> {
        let hidden = self.hidden();
        let width = hidden / self.heads;
        let starts = offsets(&trace.lengths);
        let parts: Vec<Array2<f32>> = starts
            .par_iter()
            .zip(&trace.lengths)
            .zip(&trace.attention)
            .map(|((&start, &length), weights)| {
                let rows = Slice::from(start..start + length);
                let projections = trace.query_key_value.slice_axis(Axis(0), rows);
                let d_rows = d_context.slice_axis(Axis(0), rows);
                let mut d_projections = Array2::<f32>::zeros((length, 3 * hidden));
                for (head, weights) in weights.iter().enumerate() {
                    let columns = |offset: usize| Slice::from(offset + head * width..offset + (head + 1) * width);
                    let (query, key, value) = (
                        projections.slice_axis(Axis(1), columns(0)),
                        projections.slice_axis(Axis(1), columns(hidden)),
                        projections.slice_axis(Axis(1), columns(2 * hidden)),
                    );
                    let d_head = d_rows.slice_axis(Axis(1), columns(0));
                    let mut d_scores = d_head.dot(&value.t());
                    for (mut d_row, row) in d_scores.rows_mut().into_iter().zip(weights.rows()) {
                        let along: f32 = d_row.iter().zip(row).map(|(d, p)| d * p).sum();
                        for (d, p) in d_row.iter_mut().zip(row) {
                            *d = p * (*d - along);
                        }
                    }
                    let mut write = |offset: usize, a: &ArrayView2<'_, f32>, b: &ArrayView2<'_, f32>| {
                        let mut out: ArrayViewMut2<'_, f32> = d_projections.slice_axis_mut(Axis(1), columns(offset));
                        general_mat_mul(1.0, a, b, 0.0, &mut out);
                    };
                    write(0, &d_scores.view(), &key);
                    write(hidden, &d_scores.t(), &query);
                    write(2 * hidden, &weights.t(), &d_head);
                }
                d_projections
            })
            .collect();
        let mut d_projections = Array2::<f32>::zeros((trace.input.nrows(), 3 * hidden));
        for (part, (&start, &length)) in parts.iter().zip(starts.iter().zip(&trace.lengths)) {
            d_projections
                .slice_axis_mut(Axis(0), Slice::from(start..start + length))
                .assign(part);
        }
        d_projections
    }

    /// Every parameter, in [`LayerGradient::parts`]' order.
    pub fn parameters_mut(&mut self) -> Result<Vec<&mut [f32]>, EmbedError> {
        let layer = &mut self.layer;
        let mut parameters = Vec::with_capacity(12);
        for (dense, norm) in [
            (&mut layer.query_key_value, None),
            (&mut layer.attention_output, Some(&mut layer.attention_norm)),
            (&mut layer.intermediate, None),
            (&mut layer.output, Some(&mut layer.output_norm)),
        ] {
            parameters.push(
                dense
                    .weight
                    .as_slice_mut()
                    .ok_or_else(|| EmbedError::Embed("a weight matrix is not contiguous".into()))?,
            );
            parameters.push(dense.bias.as_mut_slice());
            if let Some(norm) = norm {
                parameters.push(norm.gamma.as_mut_slice());
                parameters.push(norm.beta.as_mut_slice());
            }
        }
        Ok(parameters)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo_random(seed: u64, count: usize, scale: f32) -> Vec<f32> {
        let mut rng = crate::rng::SplitMix::new(seed);
        #[allow(clippy::cast_possible_truncation)]
        (0..count)
            .map(|_| (rng.next_unit() as f32 * 2.0 - 1.0) * scale)
            .collect()
    }

    fn tiny_layer(hidden: usize, intermediate: usize) -> TrainableLayer {
        let dense = |seed: u64, inputs: usize, outputs: usize| Dense {
            weight: Array2::from_shape_vec((inputs, outputs), pseudo_random(seed, inputs * outputs, 0.5)).unwrap(),
            bias: pseudo_random(seed + 100, outputs, 0.1),
        };
        let norm = |seed: u64| LayerNorm {
            gamma: pseudo_random(seed, hidden, 0.3).iter().map(|g| 1.0 + g).collect(),
            beta: pseudo_random(seed + 1, hidden, 0.1),
            eps: 1e-5,
        };
        TrainableLayer {
            layer: Layer {
                query_key_value: dense(1, hidden, 3 * hidden),
                attention_output: dense(2, hidden, hidden),
                attention_norm: norm(3),
                intermediate: dense(4, hidden, intermediate),
                output: dense(5, intermediate, hidden),
                output_norm: norm(6),
            },
            heads: 2,
        }
    }

    /// A loss that weighs every output differently, so no gradient cancels by symmetry.
    fn loss(layer: &TrainableLayer, states: &[f32], lengths: &[usize], weights: &[f32]) -> f64 {
        let (output, _) = layer.forward(states, lengths).unwrap();
        output.iter().zip(weights).map(|(o, w)| f64::from(o * w)).sum()
    }

    #[test]
    fn every_parameter_gradient_matches_finite_differences() {
        let (hidden, intermediate) = (8, 12);
        let lengths = [3, 5];
        let states = pseudo_random(7, 8 * hidden, 1.0);
        let weights = pseudo_random(8, 8 * hidden, 1.0);
        let layer = tiny_layer(hidden, intermediate);
        let (_, trace) = layer.forward(&states, &lengths).unwrap();
        let gradient = layer.backward(&trace, &weights).unwrap();
        let mut probe = layer.clone();
        let sizes: Vec<usize> = probe.parameters_mut().unwrap().iter().map(|p| p.len()).collect();
        assert_eq!(sizes.len(), 12);
        let step = 1e-2_f32;
        let mut checked = 0;
        for (part, &size) in sizes.iter().enumerate() {
            assert_eq!(
                gradient.parts[part].len(),
                size,
                "parameter {part}'s gradient has its size"
            );
            // Every parameter of small tensors, a spread of them in large ones.
            for index in (0..size).step_by(1 + size / 24) {
                let mut nudged = layer.clone();
                let original = nudged.parameters_mut().unwrap()[part][index];
                nudged.parameters_mut().unwrap()[part][index] = original + step;
                let up = loss(&nudged, &states, &lengths, &weights);
                nudged.parameters_mut().unwrap()[part][index] = original - step;
                let down = loss(&nudged, &states, &lengths, &weights);
                let numeric = (up - down) / (2.0 * f64::from(step));
                let analytic = f64::from(gradient.parts[part][index]);
                let tolerance = 2e-2 * numeric.abs().max(analytic.abs()).max(0.05);
                assert!(
                    (numeric - analytic).abs() <= tolerance,
                    "parameter {part}[{index}]: finite differences {numeric}, backward {analytic}"
                );
                checked += 1;
            }
        }
        assert!(checked > 150, "checked {checked} parameters");
    }

    #[test]
    fn the_training_forward_pass_is_the_served_one() {
        let (hidden, intermediate) = (8, 12);
        let lengths = [4, 2];
        let states = pseudo_random(9, 6 * hidden, 1.0);
        let layer = tiny_layer(hidden, intermediate);
        let (trained, _) = layer.forward(&states, &lengths).unwrap();
        let served = layer.layer.run(2, &states, &lengths).unwrap();
        for (a, b) in trained.iter().zip(&served) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }
}
