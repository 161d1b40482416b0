//! S3 for builds: AWS Signature V4 ([`sigv4`]: in headers, and presigned URLs), the client of
//! whoever holds a key ([`S3Client`]: PUT, the multipart upload's create/complete/abort, HEAD,
//! DELETE, ListMultipartUploads, presigning), and the part-upload engine ([`Uploader`]) that
//! sends a file in parts several at a time, each request authorized by an [`Authorizer`]:
//! [`DirectUpload`] signs with credentials here (a host run, `builder-agent upload`), and
//! [`NodeGrant`] asks the node agent for presigned requests (the builder VM, which holds no
//! key). One engine, two authorizers. Its dependencies are few and pure Rust, so it links into
//! the static guest agent.

mod client;
mod engine;
mod grant;
mod sigv4;

pub use client::{
    content_md5, md5_hex, multipart_etag, Expected, ObjectAttributes, ObjectHead, OpenUpload,
    S3Client, S3Error, MAX_PRESIGN_EXPIRY, REQUEST_RETRY,
};
pub use engine::{
    digest, Authorizer, DirectUpload, Uploader, DEFAULT_PARTS_IN_FLIGHT, DEFAULT_PART_SIZE,
};
pub use grant::{GrantedObject, NodeGrant};
pub use sigv4::UNSIGNED_PAYLOAD;
