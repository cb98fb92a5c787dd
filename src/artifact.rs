//! Reading and writing the safetensors files every artifact under `routers/` is made of,
//! so each router states only which tensors it has, not how bytes become floats.

use std::path::Path;

use half::f16;
use safetensors::tensor::{Dtype, TensorView};

/// How a tensor is stored on disk; always `f32` in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    F32,
    /// Half the bytes, for large tables whose values need ~3 significant digits.
    F16,
}

/// One tensor to write.
pub struct Tensor<'a> {
    pub name: &'a str,
    pub values: &'a [f32],
    pub shape: Vec<usize>,
    pub storage: Storage,
}

impl<'a> Tensor<'a> {
    #[must_use]
    pub fn f32(name: &'a str, values: &'a [f32], shape: Vec<usize>) -> Self {
        Self {
            name,
            values,
            shape,
            storage: Storage::F32,
        }
    }

    #[must_use]
    pub fn f16(name: &'a str, values: &'a [f32], shape: Vec<usize>) -> Self {
        Self {
            name,
            values,
            shape,
            storage: Storage::F16,
        }
    }
}

/// Writes `tensors` to `path` (safetensors, little-endian), replacing it atomically (a
/// sibling file renamed over it), with the permissions any new file gets here.
///
/// Not `safetensors::serialize_to_file`: it writes through a private temporary file, so every
/// artifact came out readable by its owner only, and an image that copies `routers/` and
/// serves as an unprivileged user (our Dockerfile's) could not read them.
pub fn write(path: &Path, tensors: &[Tensor<'_>]) -> Result<(), String> {
    let encoded: Vec<(Vec<u8>, Dtype)> = tensors
        .iter()
        .map(|tensor| match tensor.storage {
            Storage::F32 => (tensor.values.iter().flat_map(|v| v.to_le_bytes()).collect(), Dtype::F32),
            Storage::F16 => (
                tensor
                    .values
                    .iter()
                    .flat_map(|v| f16::from_f32(*v).to_le_bytes())
                    .collect(),
                Dtype::F16,
            ),
        })
        .collect();
    let views: Vec<(&str, TensorView<'_>)> = tensors
        .iter()
        .zip(&encoded)
        .map(|(tensor, (bytes, dtype))| {
            TensorView::new(*dtype, tensor.shape.clone(), bytes)
                .map(|view| (tensor.name, view))
                .map_err(|e| format!("{}: {}: {e}", path.display(), tensor.name))
        })
        .collect::<Result<_, _>>()?;
    let bytes = safetensors::serialize(views, None).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut partial = path.as_os_str().to_owned();
    partial.push(format!(".partial-{}", std::process::id()));
    let partial = std::path::PathBuf::from(partial);
    std::fs::write(&partial, bytes)
        .and_then(|()| std::fs::rename(&partial, path))
        .map_err(|e| {
            let _ = std::fs::remove_file(&partial);
            format!("{}: {e}", path.display())
        })
}

/// A loaded safetensors file, with its sha256 (hashed from the bytes already read).
pub struct Loaded {
    bytes: Vec<u8>,
    pub sha256: String,
    path: String,
}

impl Loaded {
    pub fn read(path: &Path) -> Result<Self, String> {
        let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Self {
            sha256: crate::embed::sha256_hex(&bytes),
            bytes,
            path: path.display().to_string(),
        })
    }

    /// The tensor `name` as `f32` values (from f32 or f16 storage) and its shape.
    pub fn tensor(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>), String> {
        let tensors = safetensors::SafeTensors::deserialize(&self.bytes).map_err(|e| format!("{}: {e}", self.path))?;
        let view = tensors
            .tensor(name)
            .map_err(|e| format!("{}: {name}: {e}", self.path))?;
        let values = match view.dtype() {
            Dtype::F32 => view
                .data()
                .chunks_exact(4)
                .map(|q| f32::from_le_bytes([q[0], q[1], q[2], q[3]]))
                .collect(),
            Dtype::F16 => view
                .data()
                .chunks_exact(2)
                .map(|pair| f16::from_le_bytes([pair[0], pair[1]]).to_f32())
                .collect(),
            other => return Err(format!("{}: {name}: unsupported dtype {other:?}", self.path)),
        };
        Ok((values, view.shape().to_vec()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_round_trip_in_both_storages() {
        let scratch = tempfile::tempdir().unwrap();
        let dir = scratch.path();
        let path = dir.join("t.safetensors");
        let exact = [1.5_f32, -2.25, 1e-3, 7.0];
        let halved = [0.333_333_f32, 1000.1];
        write(
            &path,
            &[
                Tensor::f32("exact", &exact, vec![2, 2]),
                Tensor::f16("halved", &halved, vec![2]),
            ],
        )
        .unwrap();
        let loaded = Loaded::read(&path).unwrap();
        assert_eq!(loaded.tensor("exact").unwrap(), (exact.to_vec(), vec![2, 2]));
        let (values, shape) = loaded.tensor("halved").unwrap();
        assert_eq!(shape, vec![2]);
        for (got, want) in values.iter().zip(halved) {
            assert!((got - want).abs() / want < 1e-3, "{got} vs {want}");
        }
        assert!(loaded.tensor("missing").unwrap_err().contains("missing"));
        assert_eq!(loaded.sha256, crate::embed::sha256_file(&path).unwrap());
    }

    #[cfg(unix)]
    #[test]
    fn artifacts_get_the_permissions_of_any_new_file() {
        use std::os::unix::fs::PermissionsExt;
        let scratch = tempfile::tempdir().unwrap();
        let dir = scratch.path();
        let plain = dir.join("plain");
        std::fs::write(&plain, b"x").unwrap();
        let artifact = dir.join("a.safetensors");
        write(&artifact, &[Tensor::f32("x", &[1.0], vec![1])]).unwrap();
        // Written twice: replacing an existing artifact keeps the same rule.
        write(&artifact, &[Tensor::f32("x", &[2.0], vec![1])]).unwrap();
        let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&artifact), mode(&plain), "umask decides, as for any file");
        assert_eq!(Loaded::read(&artifact).unwrap().tensor("x").unwrap().0, vec![2.0]);
        let leftovers: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .filter_map(Result::ok)
            .filter(|entry| entry.file_name().to_string_lossy().contains(".partial"))
            .collect();
        assert!(leftovers.is_empty(), "no partial file is left behind");
    }
}
