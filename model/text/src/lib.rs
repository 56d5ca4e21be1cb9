//! meshrec's pre-trained sentence encoder: a BERT in burn that loads Hugging Face weights
//! (all-MiniLM-L6-v2 from safetensors), WordPiece tokenisation by the `tokenizers` crate, mean
//! pooling and normalisation as sentence-transformers defines them, and a cache of encoded
//! item texts keyed by the weights and the texts.

pub mod bert;
pub mod cache;
pub mod encoder;
pub mod error;

pub use bert::{Bert, BertConfig};
pub use cache::{encode_cached, TextTable};
pub use encoder::SentenceEncoder;
pub use error::TextError;
