-- Send every chest radiograph Orthanc receives to ShadowSpot (the "shadowspot" modality).
-- The node's own results (SEG, SR, PR, SC) are not sent back, so nothing loops.
local ANALYSED_MODALITIES = { CR = true, DX = true }

function OnStoredInstance(instanceId, tags, metadata, origin)
  if ANALYSED_MODALITIES[tags['Modality']] and metadata['RemoteAET'] ~= 'SHADOWSPOT' then
    SendToModality(instanceId, 'shadowspot')
  end
end
