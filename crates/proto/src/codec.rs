//! The public API's codec: prost's, except that a message that does not decode
//! (invalid UTF-8 in a string, a truncated field, a wrong wire type) is
//! INVALID_ARGUMENT. prost's codec says INTERNAL, which tells a client the server
//! broke when its own request was at fault.

use prost::Message;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::Status;
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

#[derive(Debug, Clone)]
pub struct ClientErrorCodec<T, U>(ProstCodec<T, U>);

impl<T, U> Default for ClientErrorCodec<T, U> {
    fn default() -> Self {
        ClientErrorCodec(ProstCodec::default())
    }
}

impl<T, U> Codec for ClientErrorCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ClientErrorDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        ClientErrorDecoder(self.0.decoder())
    }
}

#[derive(Debug, Clone)]
pub struct ClientErrorDecoder<U>(ProstDecoder<U>);

impl<U: Message + Default> Decoder for ClientErrorDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0
            .decode(buf)
            .map_err(|s| Status::invalid_argument(format!("malformed protobuf message: {}", s.message())))
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}
