//! What a published payload holds: the manifest (its first buffer), then each non-empty file.

use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Tells a payload of this tool from any other payload.
const MAGIC: &str = "mooncake_p2p manifest v1";

/// The first buffer of a payload published by this tool.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Manifest {
    magic: String,
    /// Whether `PATH` was a directory (`files` are relative to it) or one file (one entry,
    /// path `""`).
    pub(crate) directory: bool,
    /// The files in payload order (sorted by path); empty files have no buffer.
    pub(crate) files: Vec<FileEntry>,
}

/// One file of a payload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct FileEntry {
    /// Relative path, `/`-separated, UTF-8; `""` for a single-file payload.
    pub(crate) path: String,
    /// Size in bytes.
    pub(crate) size: u64,
}

impl Manifest {
    /// The manifest of `path` (a file or a directory, walked recursively; symbolic links and
    /// other special files are refused rather than followed).
    pub(crate) fn of(path: &Path) -> Result<Self, String> {
        let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
        if meta.is_file() {
            let files = vec![FileEntry {
                path: String::new(),
                size: meta.len(),
            }];
            return Ok(Manifest::new(false, files));
        }
        let mut files = Vec::new();
        walk(path, String::new(), &mut files)?;
        files.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(Manifest::new(true, files))
    }

    fn new(directory: bool, files: Vec<FileEntry>) -> Self {
        Manifest {
            magic: MAGIC.to_owned(),
            directory,
            files,
        }
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("a manifest always encodes")
    }

    /// Decodes and checks a manifest against the payload's buffer sizes (`size_list[1..]`):
    /// refuses paths that could leave the destination.
    pub(crate) fn decode(bytes: &[u8], buffer_sizes: &[u64]) -> Result<Self, String> {
        let m: Manifest = postcard::from_bytes(bytes)
            .map_err(|e| format!("not a payload of mooncake_p2p publish ({e})"))?;
        if m.magic != MAGIC {
            return Err("not a payload of mooncake_p2p publish".into());
        }
        let sizes: Vec<u64> = m.files.iter().map(|f| f.size).filter(|&s| s > 0).collect();
        if sizes != buffer_sizes {
            return Err("the manifest does not match the payload's buffers".into());
        }
        match m.directory {
            false if m.files.len() == 1 && m.files[0].path.is_empty() => {}
            false => return Err("a single-file manifest with other entries".into()),
            true => {
                for f in &m.files {
                    relative(&f.path)?;
                }
                let sorted = m.files.windows(2).all(|w| w[0].path < w[1].path);
                if !sorted {
                    return Err("manifest paths unsorted or repeated".into());
                }
            }
        }
        Ok(m)
    }

    /// Where each file goes under `dest`.
    pub(crate) fn destination(&self, dest: &Path, file: &FileEntry) -> PathBuf {
        match self.directory {
            true => dest.join(&file.path),
            false => dest.to_owned(),
        }
    }
}

/// `path` as a relative path that stays below its base: normal components only.
fn relative(path: &str) -> Result<&Path, String> {
    let p = Path::new(path);
    let normal = p.components().all(|c| matches!(c, Component::Normal(_)));
    if path.is_empty() || !normal || path.contains('\\') || path.contains('\0') {
        return Err(format!("unsafe path {path:?} in the manifest"));
    }
    Ok(p)
}

fn walk(dir: &Path, prefix: String, out: &mut Vec<FileEntry>) -> Result<(), String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("{}: {e}", dir.display()))?;
        let name = entry.file_name();
        let name = name
            .to_str()
            .ok_or_else(|| format!("{}: file name is not UTF-8", entry.path().display()))?;
        let path = match prefix.is_empty() {
            true => name.to_owned(),
            false => format!("{prefix}/{name}"),
        };
        let kind = entry
            .file_type()
            .map_err(|e| format!("{}: {e}", entry.path().display()))?;
        if kind.is_dir() {
            walk(&entry.path(), path, out)?;
        } else if kind.is_file() {
            let meta = entry
                .metadata()
                .map_err(|e| format!("{}: {e}", entry.path().display()))?;
            out.push(FileEntry {
                path,
                size: meta.len(),
            });
        } else {
            return Err(format!(
                "{}: not a regular file or directory (symbolic links are not followed)",
                entry.path().display()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_manifests_are_refused() {
        let file = |path: &str, size| FileEntry {
            path: path.into(),
            size,
        };
        let ok = Manifest::new(true, vec![file("a", 1), file("b/c", 0), file("b/d", 2)]);
        assert_eq!(Manifest::decode(&ok.encode(), &[1, 2]).unwrap(), ok);
        assert!(Manifest::decode(&ok.encode(), &[1]).is_err());
        for bad in ["../x", "/etc/passwd", "a/../../x", "", "./a", "a\\..\\b"] {
            let m = Manifest::new(true, vec![file(bad, 1)]);
            assert!(Manifest::decode(&m.encode(), &[1]).is_err(), "{bad}");
        }
        let twice = Manifest::new(true, vec![file("a", 1), file("a", 1)]);
        assert!(Manifest::decode(&twice.encode(), &[1, 1]).is_err());
        let single = Manifest::new(false, vec![file("x", 1)]);
        assert!(Manifest::decode(&single.encode(), &[1]).is_err());
        assert!(Manifest::decode(b"garbage", &[]).is_err());
    }
}
