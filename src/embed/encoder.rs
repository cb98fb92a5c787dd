//! A BERT encoder's forward pass (all-MiniLM-L6-v2 and its family) over the model's own
//! safetensors weights.
//!
//! Why our own rather than candle-transformers' `BertModel`: at batch 1 and 128 tokens that
//! model took 39.5 ms here, half of it outside the matrix products (a tensor allocation per
//! elementwise op, a libm `erf` per activation, separate Q/K/V products, padding masks); this
//! one takes 19–22 ms and builds without candle. The products run on matrixmultiply (through
//! ndarray), the rest is a handful of loops:
//! - sequences are packed, not padded: the dense layers see every real token of a batch as
//!   one matrix and attention runs per sequence, so no position is ever masked;
//! - Q, K and V are one product, with the attention scale folded into Q's weights, and the
//!   per-head products read that product's rows in place;
//! - the two cores split each dense product by output columns and attention by heads;
//! - GELU's `erf`, softmax's `exp` and the row reductions are branch-free, so they vectorise.

use std::sync::Arc;

use ndarray::linalg::general_mat_mul;
use ndarray::{Array2, ArrayView2, ArrayViewMut2, Axis, Slice};

use super::EmbedError;

/// The fields of a Hugging Face BERT `config.json` the forward pass needs.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct BertConfig {
    pub hidden_size: usize,
    pub num_attention_heads: usize,
    pub num_hidden_layers: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    pub vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_position_type")]
    pub position_embedding_type: String,
}

fn default_eps() -> f64 {
    1e-12
}

fn default_act() -> String {
    "gelu".into()
}

fn default_position_type() -> String {
    "absolute".into()
}

pub(super) fn numeric(error: impl std::fmt::Display) -> EmbedError {
    EmbedError::Embed(error.to_string())
}

#[derive(Clone)]
pub(super) struct LayerNorm {
    pub(super) gamma: Vec<f32>,
    pub(super) beta: Vec<f32>,
    pub(super) eps: f32,
}

impl LayerNorm {
    /// Normalises every row of `rows` (row length = `gamma.len()`) in place.
    fn apply(&self, rows: &mut [f32]) {
        let width = self.gamma.len();
        #[allow(clippy::cast_precision_loss)]
        let inverse_width = 1.0 / width as f32;
        for row in rows.chunks_exact_mut(width) {
            let mean = lane_sum(row, |v| v) * inverse_width;
            for value in row.iter_mut() {
                *value -= mean;
            }
            let variance = lane_sum(row, |v| v * v) * inverse_width;
            let scale = 1.0 / (variance + self.eps).sqrt();
            for ((value, gamma), beta) in row.iter_mut().zip(&self.gamma).zip(&self.beta) {
                *value = *value * scale * gamma + beta;
            }
        }
    }
}

/// `x · W + b` with `W` stored `[in, out]`.
#[derive(Clone)]
pub(super) struct Dense {
    pub(super) weight: Array2<f32>,
    pub(super) bias: Vec<f32>,
}

impl Dense {
    /// From `PyTorch`'s `[out, in]` layout.
    fn new(weight: Vec<f32>, bias: Vec<f32>, inputs: usize) -> Result<Self, EmbedError> {
        let outputs = bias.len();
        let weight = Array2::from_shape_vec((outputs, inputs), weight)
            .map_err(|e| EmbedError::Load(format!("a dense layer's weights do not match its bias: {e}")))?;
        // Stored transposed and contiguous: the product then streams each weight row once.
        let weight = weight.t().as_standard_layout().into_owned();
        Ok(Self { weight, bias })
    }

    /// `rows` is `[n, in]` row-major; returns `[n, out]` with `activation` applied after the
    /// bias (the product on both cores, [`split_product`]).
    pub(super) fn apply(&self, rows: &[f32], activation: impl Fn(f32) -> f32) -> Result<Vec<f32>, EmbedError> {
        let (inputs, outputs) = self.weight.dim();
        let count = rows.len() / inputs;
        let input = ArrayView2::from_shape((count, inputs), rows).map_err(numeric)?;
        let mut out = vec![0.0_f32; count * outputs];
        let product = ArrayViewMut2::from_shape((count, outputs), &mut out).map_err(numeric)?;
        split_product(&input, &self.weight.view(), product);
        for row in out.chunks_exact_mut(outputs) {
            for (value, bias) in row.iter_mut().zip(&self.bias) {
                *value = activation(*value + bias);
            }
        }
        Ok(out)
    }
}

/// `out = a · b`, `b`'s (and `out`'s) columns split over two threads: each reads half of
/// `b`, which is what the product spends its memory traffic on at the row counts seen here.
pub(super) fn split_product(a: &ArrayView2<'_, f32>, b: &ArrayView2<'_, f32>, mut out: ArrayViewMut2<'_, f32>) {
    let half = b.ncols() / 2;
    let (left_b, right_b) = b.view().split_at(Axis(1), half);
    let (mut left, mut right) = out.view_mut().split_at(Axis(1), half);
    rayon::join(
        || general_mat_mul(1.0, a, &left_b, 0.0, &mut left),
        || general_mat_mul(1.0, a, &right_b, 0.0, &mut right),
    );
}

/// Tensor lookup by Hugging Face name, with or without the `bert.` prefix that checkpoints
/// saved from task models carry, and with the size `config.json` implies checked.
struct Weights<'a, F>(&'a mut F);

impl<F: FnMut(&str) -> Result<(Vec<f32>, Vec<usize>), String>> Weights<'_, F> {
    fn get(&mut self, name: &str, expected: Option<usize>) -> Result<Vec<f32>, EmbedError> {
        let (values, _) = (self.0)(name)
            .or_else(|_| (self.0)(&format!("bert.{name}")))
            .map_err(|e| EmbedError::Load(format!("model.safetensors: {e}")))?;
        match expected {
            Some(expected) if values.len() != expected => Err(EmbedError::Load(format!(
                "model.safetensors: {name} has {} values, config.json implies {expected}",
                values.len()
            ))),
            _ => Ok(values),
        }
    }

    fn dense(&mut self, prefix: &str, inputs: usize, outputs: usize) -> Result<Dense, EmbedError> {
        let weight = self.get(&format!("{prefix}.weight"), Some(inputs * outputs))?;
        let bias = self.get(&format!("{prefix}.bias"), Some(outputs))?;
        Dense::new(weight, bias, inputs)
    }

    fn norm(&mut self, prefix: &str, width: usize, eps: f32) -> Result<LayerNorm, EmbedError> {
        Ok(LayerNorm {
            gamma: self.get(&format!("{prefix}.weight"), Some(width))?,
            beta: self.get(&format!("{prefix}.bias"), Some(width))?,
            eps,
        })
    }
}

/// One transformer layer. Q, K and V are fused into one product, Q's part (weights and
/// bias) multiplied by the attention scale `1/sqrt(head width)`.
#[derive(Clone)]
pub(super) struct Layer {
    pub(super) query_key_value: Dense,
    pub(super) attention_output: Dense,
    pub(super) attention_norm: LayerNorm,
    pub(super) intermediate: Dense,
    pub(super) output: Dense,
    pub(super) output_norm: LayerNorm,
}

/// The sizes a layer's tensors are checked against, from `config.json`.
#[derive(Clone, Copy)]
struct Shape {
    hidden: usize,
    heads: usize,
    intermediate: usize,
    eps: f32,
}

impl Shape {
    #[allow(clippy::cast_precision_loss)]
    fn query_scale(self) -> f32 {
        1.0 / ((self.hidden / self.heads) as f32).sqrt()
    }
}

/// Cheap to clone: the weights are shared, so an encoder with one layer replaced (a
/// fine-tuned top layer) costs that layer's memory, not the model's.
#[derive(Clone)]
pub struct Encoder {
    word: Arc<[f32]>,
    position: Arc<[f32]>,
    /// Token type 0's vector: every input here is a single segment.
    segment: Vec<f32>,
    embedding_norm: LayerNorm,
    layers: Vec<Arc<Layer>>,
    shape: Shape,
    max_positions: usize,
    vocabulary: usize,
}

/// A layer's tensors under their Hugging Face names (`PyTorch` layout), for artifacts that
/// carry a replacement layer.
pub type NamedTensor = (String, Vec<f32>, Vec<usize>);

impl Layer {
    fn load<F>(weights: &mut Weights<'_, F>, prefix: &str, shape: Shape) -> Result<Self, EmbedError>
    where
        F: FnMut(&str) -> Result<(Vec<f32>, Vec<usize>), String>,
    {
        let hidden = shape.hidden;
        let mut fused_weight = Vec::with_capacity(3 * hidden * hidden);
        let mut fused_bias = Vec::with_capacity(3 * hidden);
        for (part, scale) in [("query", shape.query_scale()), ("key", 1.0), ("value", 1.0)] {
            let weight = weights.get(&format!("{prefix}.attention.self.{part}.weight"), Some(hidden * hidden))?;
            let bias = weights.get(&format!("{prefix}.attention.self.{part}.bias"), Some(hidden))?;
            fused_weight.extend(weight.iter().map(|w| w * scale));
            fused_bias.extend(bias.iter().map(|b| b * scale));
        }
        let eps = shape.eps;
        Ok(Self {
            query_key_value: Dense::new(fused_weight, fused_bias, hidden)?,
            attention_output: weights.dense(&format!("{prefix}.attention.output.dense"), hidden, hidden)?,
            attention_norm: weights.norm(&format!("{prefix}.attention.output.LayerNorm"), hidden, eps)?,
            intermediate: weights.dense(&format!("{prefix}.intermediate.dense"), hidden, shape.intermediate)?,
            output: weights.dense(&format!("{prefix}.output.dense"), shape.intermediate, hidden)?,
            output_norm: weights.norm(&format!("{prefix}.output.LayerNorm"), hidden, eps)?,
        })
    }

    /// The inverse of [`Layer::load`]: Hugging Face names, `[out, in]` weights, Q unscaled.
    fn tensors(&self, prefix: &str, shape: Shape) -> Vec<NamedTensor> {
        let hidden = shape.hidden;
        let pytorch = |dense: &Dense, columns: std::ops::Range<usize>, scale: f32| {
            let part = dense.weight.slice_axis(Axis(1), Slice::from(columns.clone()));
            let values: Vec<f32> = part.t().iter().map(|w| w / scale).collect();
            let bias: Vec<f32> = dense.bias[columns].iter().map(|b| b / scale).collect();
            (values, bias)
        };
        let mut tensors = Vec::new();
        let mut push = |name: String, (weight, bias): (Vec<f32>, Vec<f32>)| {
            let (outputs, inputs) = (bias.len(), weight.len() / bias.len().max(1));
            tensors.push((format!("{name}.weight"), weight, vec![outputs, inputs]));
            tensors.push((format!("{name}.bias"), bias, vec![outputs]));
        };
        for (index, (part, scale)) in [("query", shape.query_scale()), ("key", 1.0), ("value", 1.0)]
            .into_iter()
            .enumerate()
        {
            push(
                format!("{prefix}.attention.self.{part}"),
                pytorch(&self.query_key_value, index * hidden..(index + 1) * hidden, scale),
            );
        }
        let whole = |dense: &Dense| pytorch(dense, 0..dense.bias.len(), 1.0);
        push(
            format!("{prefix}.attention.output.dense"),
            whole(&self.attention_output),
        );
        push(format!("{prefix}.intermediate.dense"), whole(&self.intermediate));
        push(format!("{prefix}.output.dense"), whole(&self.output));
        for (name, norm) in [
            ("attention.output.LayerNorm", &self.attention_norm),
            ("output.LayerNorm", &self.output_norm),
        ] {
            tensors.push((format!("{prefix}.{name}.weight"), norm.gamma.clone(), vec![hidden]));
            tensors.push((format!("{prefix}.{name}.bias"), norm.beta.clone(), vec![hidden]));
        }
        tensors
    }
}

impl Encoder {
    /// Builds the encoder from `config` and a tensor lookup by Hugging Face name.
    pub fn load(
        config: &BertConfig,
        mut tensor: impl FnMut(&str) -> Result<(Vec<f32>, Vec<usize>), String>,
    ) -> Result<Self, EmbedError> {
        if config.hidden_act != "gelu" {
            return Err(EmbedError::Load(format!(
                "hidden_act {:?} is not supported (only BERT's erf GELU, \"gelu\")",
                config.hidden_act
            )));
        }
        if config.position_embedding_type != "absolute" {
            return Err(EmbedError::Load(format!(
                "position_embedding_type {:?} is not supported (only \"absolute\")",
                config.position_embedding_type
            )));
        }
        let hidden = config.hidden_size;
        let heads = config.num_attention_heads;
        if heads == 0 || hidden % heads != 0 {
            return Err(EmbedError::Load(format!(
                "hidden_size {hidden} is not a multiple of num_attention_heads {heads}"
            )));
        }
        let mut weights = Weights(&mut tensor);
        #[allow(clippy::cast_possible_truncation)]
        let eps = config.layer_norm_eps as f32;
        let shape = Shape {
            hidden,
            heads,
            intermediate: config.intermediate_size,
            eps,
        };
        let embedding_norm = weights.norm("embeddings.LayerNorm", hidden, eps)?;
        let word = weights.get("embeddings.word_embeddings.weight", Some(config.vocab_size * hidden))?;
        let position = weights.get(
            "embeddings.position_embeddings.weight",
            Some(config.max_position_embeddings * hidden),
        )?;
        let mut segment = weights.get("embeddings.token_type_embeddings.weight", None)?;
        if segment.len() < hidden || segment.len() % hidden != 0 {
            return Err(EmbedError::Load(
                "model.safetensors: token_type_embeddings does not match hidden_size".into(),
            ));
        }
        segment.truncate(hidden);
        let layers = (0..config.num_hidden_layers)
            .map(|index| Layer::load(&mut weights, &format!("encoder.layer.{index}"), shape).map(Arc::new))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            word: word.into(),
            position: position.into(),
            segment,
            embedding_norm,
            layers,
            shape,
            max_positions: config.max_position_embeddings,
            vocabulary: config.vocab_size,
        })
    }

    /// The number of transformer layers.
    #[must_use]
    pub fn depth(&self) -> usize {
        self.layers.len()
    }

    /// This encoder with layer `index` read from `tensor` (Hugging Face names, e.g.
    /// `encoder.layer.5.output.dense.weight`); every other weight is shared with `self`.
    pub fn with_layer_from(
        &self,
        index: usize,
        mut tensor: impl FnMut(&str) -> Result<(Vec<f32>, Vec<usize>), String>,
    ) -> Result<Self, EmbedError> {
        if index >= self.layers.len() {
            return Err(EmbedError::Load(format!(
                "layer {index} does not exist: the encoder has {} layers",
                self.layers.len()
            )));
        }
        let layer = Layer::load(&mut Weights(&mut tensor), &format!("encoder.layer.{index}"), self.shape)?;
        Ok(self.with_layer(index, layer))
    }

    pub(super) fn with_layer(&self, index: usize, layer: Layer) -> Self {
        let mut encoder = self.clone();
        encoder.layers[index] = Arc::new(layer);
        encoder
    }

    pub(super) fn layer_at(&self, index: usize) -> Option<&Layer> {
        self.layers.get(index).map(AsRef::as_ref)
    }

    /// Layer `index`'s tensors under their Hugging Face names, for an artifact.
    #[must_use]
    pub fn layer_tensors(&self, index: usize) -> Vec<NamedTensor> {
        self.layers
            .get(index)
            .map(|layer| layer.tensors(&format!("encoder.layer.{index}"), self.shape))
            .unwrap_or_default()
    }

    #[must_use]
    pub fn heads(&self) -> usize {
        self.shape.heads
    }

    #[must_use]
    pub fn hidden(&self) -> usize {
        self.shape.hidden
    }

    /// The last layer's hidden states of every token of every sequence, packed: row `i` of
    /// the result belongs to the `i`-th token counting through the sequences in order.
    pub fn forward(&self, sequences: &[&[u32]]) -> Result<Vec<f32>, EmbedError> {
        self.forward_layers(sequences, self.layers.len())
    }

    /// The hidden states after the first `layers` layers, packed as in [`Encoder::forward`]:
    /// fine-tuning the top layer starts from the states below it.
    pub fn forward_layers(&self, sequences: &[&[u32]], layers: usize) -> Result<Vec<f32>, EmbedError> {
        let hidden = self.shape.hidden;
        let total: usize = sequences.iter().map(|s| s.len()).sum();
        let mut states = Vec::with_capacity(total * hidden);
        for sequence in sequences {
            if sequence.len() > self.max_positions {
                return Err(EmbedError::Embed(format!(
                    "{} tokens exceed the model's {} positions",
                    sequence.len(),
                    self.max_positions
                )));
            }
            for (position, &token) in sequence.iter().enumerate() {
                let token = token as usize;
                if token >= self.vocabulary {
                    return Err(EmbedError::Embed(format!("token id {token} is outside the vocabulary")));
                }
                let word = &self.word[token * hidden..(token + 1) * hidden];
                let place = &self.position[position * hidden..(position + 1) * hidden];
                states.extend(word.iter().zip(place).zip(&self.segment).map(|((w, p), s)| w + p + s));
            }
        }
        self.embedding_norm.apply(&mut states);
        let lengths: Vec<usize> = sequences.iter().map(|s| s.len()).collect();
        for layer in self.layers.iter().take(layers) {
            states = layer.run(self.shape.heads, &states, &lengths)?;
        }
        Ok(states)
    }
}

impl Layer {
    /// The layer's output for packed `states` (sequences of `lengths`), `heads` attention heads.
    pub(super) fn run(&self, heads: usize, states: &[f32], lengths: &[usize]) -> Result<Vec<f32>, EmbedError> {
        let layer = self;
        let hidden = layer.attention_output.bias.len();
        let query_key_value = layer.query_key_value.apply(states, |v| v)?;
        let mut context = Vec::with_capacity(states.len());
        let mut first = 0;
        for &length in lengths {
            let rows = &query_key_value[first * 3 * hidden..(first + length) * 3 * hidden];
            attend(heads, hidden, rows, length, &mut context)?;
            first += length;
        }
        let mut attended = layer.attention_output.apply(&context, |v| v)?;
        for (value, residual) in attended.iter_mut().zip(states) {
            *value += residual;
        }
        layer.attention_norm.apply(&mut attended);
        let intermediate = layer.intermediate.apply(&attended, gelu)?;
        let mut output = layer.output.apply(&intermediate, |v| v)?;
        for (value, residual) in output.iter_mut().zip(&attended) {
            *value += residual;
        }
        layer.output_norm.apply(&mut output);
        Ok(output)
    }
}

/// Self-attention over one sequence's fused `[length, 3·hidden]` projections; appends the
/// `[length, hidden]` context to `context`. Per-head products are small (at most
/// 256x32x256), where matrixmultiply's single-threaded kernel beats a threaded gemm's
/// start-up; the views read Q, K and V in place, and for sequences long enough to pay for
/// it the two halves of the heads run on two threads.
fn attend(heads: usize, hidden: usize, rows: &[f32], length: usize, context: &mut Vec<f32>) -> Result<(), EmbedError> {
    let width = hidden / heads;
    let projections = ArrayView2::from_shape((length, 3 * hidden), rows).map_err(numeric)?;
    let start = context.len();
    context.resize(start + length * hidden, 0.0);
    let output = ArrayViewMut2::from_shape((length, hidden), &mut context[start..]).map_err(numeric)?;
    let attend = |heads: std::ops::Range<usize>, mut output: ArrayViewMut2<'_, f32>| {
        let mut scores = Array2::<f32>::zeros((length, length));
        let first = heads.start;
        for head in heads {
            let columns = head * width..(head + 1) * width;
            let part = |offset: usize| {
                projections.slice_axis(Axis(1), Slice::from(offset + columns.start..offset + columns.end))
            };
            let (query, key, value) = (part(0), part(hidden), part(2 * hidden));
            general_mat_mul(1.0, &query, &key.t(), 0.0, &mut scores);
            for mut row in scores.rows_mut() {
                if let Some(row) = row.as_slice_mut() {
                    softmax(row);
                }
            }
            let local = (head - first) * width..(head - first + 1) * width;
            let mut head_output = output.slice_axis_mut(Axis(1), Slice::from(local));
            general_mat_mul(1.0, &scores, &value, 0.0, &mut head_output);
        }
    };
    // Below ~32 tokens a head takes microseconds and a thread hand-off costs as much.
    if length >= 32 && heads % 2 == 0 {
        let half = heads / 2;
        let (left, right) = output.split_at(Axis(1), half * width);
        rayon::join(|| attend(0..half, left), || attend(half..heads, right));
    } else {
        attend(0..heads, output);
    }
    Ok(())
}

/// The sum of `term(v)` over `values` in eight independent partial sums: a single running
/// sum is one long dependency chain the compiler may not reorder, which made reductions the
/// slowest loops here.
fn lane_sum(values: &[f32], term: impl Fn(f32) -> f32) -> f32 {
    let mut lanes = [0.0_f32; 8];
    let chunks = values.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().map(|&v| term(v)).sum();
    for chunk in chunks {
        for (lane, &value) in lanes.iter_mut().zip(chunk) {
            *lane += term(value);
        }
    }
    lanes.iter().sum::<f32>() + tail
}

fn lane_max(values: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let chunks = values.chunks_exact(8);
    let tail = chunks.remainder().iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for chunk in chunks {
        for (lane, &value) in lanes.iter_mut().zip(chunk) {
            // Not f32::max: its NaN rules keep it from vectorising.
            *lane = if value > *lane { value } else { *lane };
        }
    }
    lanes.iter().copied().fold(tail, f32::max)
}

pub(super) fn softmax(row: &mut [f32]) {
    let max = lane_max(row);
    for value in row.iter_mut() {
        *value = exp_non_positive(*value - max);
    }
    let sum = lane_sum(row, |v| v);
    let inverse = 1.0 / sum;
    for value in row.iter_mut() {
        *value *= inverse;
    }
}

/// `e^x` for `x <= 0` (softmax after subtracting the row maximum): `2^n · 2^f` with `n` the
/// nearest integer to `x·log2 e`, `2^f` on [-1/2, 1/2] by its degree-7 Taylor polynomial
/// (relative error below 1e-8), and `2^n` written straight into the exponent bits. Like
/// [`erf`], branch-free, so the loop vectorises; libm's `expf` was a fifth of attention.
fn exp_non_positive(x: f32) -> f32 {
    // Below -87, e^x is under f32's smallest normal number; softmax weights there are 0 in effect.
    let t = if x < -87.0 { -87.0 } else { x } * std::f32::consts::LOG2_E;
    // Adding 1.5·2^23 rounds to the nearest integer with plain SSE2 arithmetic and leaves
    // that integer in the low mantissa bits, so no (saturating, slow) float-to-int cast is needed.
    let shifted = t + 12_582_912.0;
    let rounded = shifted - 12_582_912.0;
    let f = t - rounded;
    let mut power = 1.525_273_4e-5_f32;
    for c in [
        1.540_353_e-4,
        1.333_355_8e-3,
        9.618_129e-3,
        5.550_411e-2,
        0.240_226_5,
        std::f32::consts::LN_2,
        1.0,
    ] {
        power = power * f + c;
    }
    // n >= -126 here, so n + 127 is a valid biased exponent of a normal number.
    let exponent = shifted.to_bits().wrapping_sub(0x4B40_0000).wrapping_add(127);
    let scale = f32::from_bits(exponent << 23);
    power * scale
}

/// BERT's GELU, `x·Φ(x)`, with the exact (erf) form.
pub(super) fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// `erf` as an odd rational function of degree 13/8 on [-4, 4] (beyond, erf is ±1 in f32):
/// only multiplies and adds, so the compiler vectorises it, unlike libm's branchy `erff`.
/// Absolute error below 4e-7 (pinned by a test against a series).
#[allow(clippy::excessive_precision)]
pub(super) fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut numerator = -2.726_142_3e-10_f32;
    for c in [
        2.770_681_4e-8,
        -2.101_024e-6,
        -5.692_506_4e-5,
        -7.349_906_3e-4,
        -2.954_600_1e-3,
        -1.609_603_3e-2,
    ] {
        numerator = numerator * x2 + c;
    }
    let mut denominator = -1.456_607_2e-5_f32;
    for c in [-2.133_740_6e-4, -1.682_827e-3, -7.373_329_3e-3, -1.426_473_9e-2] {
        denominator = denominator * x2 + c;
    }
    x * numerator / denominator
}

#[cfg(test)]
mod tests {
    use super::*;

    /// erf by its Maclaurin series in f64: exact to ~1e-11 on |x| <= 5.
    fn series_erf(x: f64) -> f64 {
        let mut sum = 0.0;
        let mut term = x;
        for n in 0..200 {
            sum += term / f64::from(2 * n + 1);
            term *= -x * x / f64::from(n + 1);
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    #[test]
    fn erf_matches_the_series_everywhere() {
        let mut worst = 0.0_f64;
        for step in -6000..=6000 {
            let x = f64::from(step) / 1000.0;
            let exact = if x.abs() > 5.0 { x.signum() } else { series_erf(x) };
            #[allow(clippy::cast_possible_truncation)]
            let approx = f64::from(erf(x as f32));
            worst = worst.max((approx - exact).abs());
        }
        assert!(worst < 4e-7, "worst error {worst}");
    }

    #[test]
    fn exp_matches_std_on_its_domain() {
        let mut worst_near_zero = 0.0_f64;
        let mut worst = 0.0_f64;
        for step in 0..=90_000 {
            #[allow(clippy::cast_possible_truncation)]
            let x = (-f64::from(step) / 1000.0) as f32;
            let approx = f64::from(exp_non_positive(x));
            let exact = f64::from(x).exp();
            let error = (approx - exact).abs() / exact.max(1e-30);
            if x >= -10.0 {
                worst_near_zero = worst_near_zero.max(error);
            } else if x >= -87.0 {
                worst = worst.max(error);
            }
        }
        assert!(
            worst_near_zero < 1e-6,
            "worst relative error on [-10, 0]: {worst_near_zero}"
        );
        // Rounding x·log2(e) to f32 costs up to 125·2^-24 in the exponent at x = -87.
        assert!(worst < 1e-5, "worst relative error on [-87, -10]: {worst}");
        assert!(exp_non_positive(-1000.0) < 1e-37);
        assert!((exp_non_positive(0.0) - 1.0).abs() < 1e-7);
    }

    #[test]
    fn softmax_is_a_distribution_and_keeps_order() {
        let mut row: Vec<f32> = (0..19_u8).map(|i| f32::from((i * 7) % 5) * 0.7 - 1.0).collect();
        let original = row.clone();
        softmax(&mut row);
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        let total: f32 = original.iter().map(|v| v.exp()).sum();
        for (weight, value) in row.iter().zip(&original) {
            assert!((weight - value.exp() / total).abs() < 1e-6);
        }
        let mut extreme = vec![1000.0, -1000.0];
        softmax(&mut extreme);
        assert!((extreme[0] - 1.0).abs() < 1e-6 && extreme[1] < 1e-30);
    }

    #[test]
    fn lane_reductions_match_plain_ones() {
        let values: Vec<f32> = (0..37_u16).map(|i| f32::from((i * 17) % 11) - 4.5).collect();
        for length in [0, 1, 7, 8, 9, 16, 37] {
            let part = &values[..length];
            let plain: f32 = part.iter().sum();
            assert!((lane_sum(part, |v| v) - plain).abs() < 1e-4, "sum of {length}");
            let squares: f32 = part.iter().map(|v| v * v).sum();
            assert!(
                (lane_sum(part, |v| v * v) - squares).abs() < 1e-3,
                "sum of squares of {length}"
            );
            let max = part.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(lane_max(part), max, "max of {length}");
        }
    }

    #[test]
    fn layer_norm_centres_and_scales_rows() {
        let norm = LayerNorm {
            gamma: vec![2.0; 4],
            beta: vec![1.0; 4],
            eps: 0.0,
        };
        let mut rows = vec![1.0, 2.0, 3.0, 4.0, 10.0, 10.0, 10.0, 10.0 + 1e-3];
        norm.apply(&mut rows);
        let first = &rows[..4];
        let mean = first.iter().sum::<f32>() / 4.0;
        assert!((mean - 1.0).abs() < 1e-5, "beta shifts the mean: {mean}");
        let spread = first.iter().map(|v| (v - 1.0).powi(2)).sum::<f32>() / 4.0;
        assert!((spread - 4.0).abs() < 1e-4, "gamma scales the variance: {spread}");
    }

    #[test]
    fn dense_matches_a_hand_product() {
        // PyTorch layout [out=2, in=3].
        let weight = [1.0, 2.0, 3.0, -1.0, 0.0, 1.0];
        let dense = Dense::new(weight.to_vec(), vec![0.5, -0.5], 3).unwrap();
        let out = dense.apply(&[1.0, 1.0, 1.0, 2.0, 0.0, -1.0], |v| v).unwrap();
        assert_eq!(out, vec![6.5, -0.5, -0.5, -3.5]);
    }
}
