//! The codec of the hindsight services: prost, except that a request that cannot be decoded
//! (for example a string field that is not valid UTF-8) is answered INVALID_ARGUMENT, which
//! tells the client that its input is at fault, instead of prost's INTERNAL.

use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::{Code, Status};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// [`ProstCodec`] with input errors reported as INVALID_ARGUMENT.
#[derive(Debug, Clone)]
pub struct HirCodec<T, U>(ProstCodec<T, U>);

impl<T, U> Default for HirCodec<T, U> {
    fn default() -> Self {
        Self(ProstCodec::default())
    }
}

impl<T, U> Codec for HirCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = HirDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        HirDecoder(self.0.decoder())
    }
}

/// Decodes with prost and maps decode failures to INVALID_ARGUMENT.
#[derive(Debug)]
pub struct HirDecoder<U>(ProstDecoder<U>);

impl<U: prost::Message + Default> Decoder for HirDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(buf).map_err(|status| match status.code() {
            Code::Internal => Status::invalid_argument(format!(
                "the message could not be decoded ({}); string fields must be valid UTF-8",
                status.message()
            )),
            _ => status,
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}
