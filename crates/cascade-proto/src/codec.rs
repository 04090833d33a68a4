//! The server's gRPC codec: prost's, except that a request which does not
//! decode (a truncated field, a string that is not UTF-8) is the client's
//! error. It is answered `INVALID_ARGUMENT`, not prost's `INTERNAL`, and it is
//! counted. tonic decodes before the handler runs, so the per-RPC metrics
//! never see these requests; [`decode_failures`] does.

use std::sync::atomic::{AtomicU64, Ordering};

use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::Status;
use tonic_prost::ProstCodec;

static DECODE_FAILURES: AtomicU64 = AtomicU64::new(0);

/// Requests refused since start because they did not decode.
pub fn decode_failures() -> u64 {
    DECODE_FAILURES.load(Ordering::Relaxed)
}

/// See the module docs; the generated server uses it (`build.rs`).
pub struct RequestCodec<T, U>(ProstCodec<T, U>);

impl<T, U> Default for RequestCodec<T, U> {
    fn default() -> Self {
        Self(ProstCodec::default())
    }
}

impl<T, U> Codec for RequestCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = <ProstCodec<T, U> as Codec>::Encoder;
    type Decoder = RequestDecoder<<ProstCodec<T, U> as Codec>::Decoder>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        RequestDecoder(self.0.decoder())
    }
}

/// prost's decoder with its errors reported as the client's.
pub struct RequestDecoder<D>(D);

impl<D: Decoder<Error = Status>> Decoder for RequestDecoder<D> {
    type Item = D::Item;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Status> {
        self.0.decode(src).map_err(|e| {
            DECODE_FAILURES.fetch_add(1, Ordering::Relaxed);
            Status::invalid_argument(format!(
                "the request message does not decode: {}",
                e.message()
            ))
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}
